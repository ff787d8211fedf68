"""GPU check (run from the repo root on the GPU box, no TVM there; artifacts from `make gpu-bundle`):
  1. `verify` of every single-rank artifact against the PyTorch reference at 0, 1, 7, 64, 129, 1000 and
     4096 tokens; real-size layers draw their weights on the GPU and run the reference there too, and
     print load + first forward; on the first real-size one (DeepSeek-V3 in the bundle) the weights the
     artifact's CUDA pack kernels packed must equal runtime/packing.py's, both timed;
  2. a CUDA-graph replay equals eager on new inputs; hidden_states that start mid-vector give the aligned
     result; load + first forward time;
  3. graph-replay timings of the Qwen3-30B-A3B layer (the full comparison is `moegen bench`).
MOEGEN_GPU_ARTIFACTS (default gpu-bundle/artifacts) names the artifacts; MOEGEN_GPU_ONLY a comma list
of artifact names to restrict step 1; MOEGEN_GPU_TARGET (default cuda-sm90) the target directory of each
(cuda-sm80 artifacts run on a Hopper GPU through their embedded compute_80 PTX).
"""
import json, math, os, time
from pathlib import Path

import torch

from gpu_layers import misaligned, same_output
from moegen.artifact import TOLERANCES, read_manifest
from moegen.reference import moe_ref, random_weights
from moegen.runtime import MoERunner, packing
from moegen.runtime.runner import pick_path
from moegen.spec import spec_from_dict
from moegen.verify import rel_error, verify_artifact

ART = Path(os.environ.get("MOEGEN_GPU_ARTIFACTS", "gpu-bundle/artifacts"))
ONLY = [s for s in os.environ.get("MOEGEN_GPU_ONLY", "").split(",") if s]
TARGET = os.environ.get("MOEGEN_GPU_TARGET", "cuda-sm90")
TOKENS = [0, 1, 7, 64, 129, 1000, 4096]
MULTI_RANK = ("tp2", "ep2")  # scripts/nccl_check.py
REAL_BYTES = 2 << 30  # layers with more weight bytes than this verify with weights drawn on the GPU
print(torch.cuda.get_device_name(), torch.__version__, flush=True)


def weight_bytes(spec) -> int:
    from moegen.spec import weights_contract
    return sum(math.prod(shape) * torch.finfo(getattr(torch, dt)).bits // 8
               for shape, dt in weights_contract(spec).values())


def cuda_ms(fn) -> float:
    """Milliseconds of GPU time of what fn launches on the current stream (torch.cuda.Event)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def check_packing(r: MoERunner, w: dict, spec) -> bool:
    """The runner's packed weights (the artifact's pack_{w13,w2}_n{BN} kernels, run at load) equal
    runtime/packing.py's tiles bit for bit; times both ways. The kernel is timed rerunning it into the
    runner's own packed tensor (same values), so only one extra copy of a weight is ever alive."""
    import torch.nn.functional as F

    ok = True
    pad = spec.kernel_hidden - spec.routed_width
    for name in ("w13", "w2"):
        src = w[name]
        src = (F.pad(src, (0, pad)) if name == "w13" else F.pad(src, (0, 0, 0, pad))) if pad else src
        done = set()
        for (up, down), (w13p, _, w2p, _) in r._packed.items():
            bn, got = (up, w13p) if name == "w13" else (down, w2p)
            if bn in done:
                continue
            done.add(bn)
            fn = r._fns.get(f"pack_{name}_n{bn}")
            if fn is None:
                print(f"  packing {name} BN={bn}: the artifact has no pack kernel (torch packed it) FAIL", flush=True)
                ok = False
                continue
            gb = 2 * src.numel() * src.element_size() / 1e9  # read once, written once

            def run_kernel():
                with r._stream():
                    fn(src.contiguous(), got)

            def run_torch():
                return packing.pack_w13(src, bn, spec.gated) if name == "w13" else packing.pack_w2(src, bn)

            run_kernel()  # warm
            t_kernel = cuda_ms(run_kernel)
            want = [None]
            t_torch = cuda_ms(lambda: want.__setitem__(0, run_torch()))
            same = torch.equal(got, want[0])
            del want
            torch.cuda.empty_cache()
            ok &= same
            # gb: bytes read + written; GB / ms = TB/s
            print(f"  packing {name} BN={bn} ({gb / 2:.1f} GB each way): pack kernel {t_kernel:.2f} ms "
                  f"({gb / t_kernel:.2f} TB/s), torch {t_torch:.2f} ms ({gb / t_torch:.2f} TB/s); equal: {same} "
                  f"{'ok' if same else 'FAIL'}",
                  flush=True)
        del src
    return ok


PACK_CHECKED = []  # the artifact whose packing was checked (the first real-size one)


def verify_on_gpu(root: Path, spec, tokens) -> bool:
    """verify's random cases with weights, inputs and the reference all on the GPU; load + first
    forward time; the packing check on the first real-size artifact."""
    w = random_weights(spec, 1, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = MoERunner.load(root, w, device="cuda")
    x = torch.randn(33, spec.hidden_size, device="cuda").to(getattr(torch, spec.dtype))
    r(x, torch.randn(33, spec.num_experts, device="cuda"))
    torch.cuda.synchronize()
    kernels = any(f.startswith("pack_") for f in r.manifest["functions"])
    print(f"  load + first forward (33 tokens) {(time.perf_counter() - t0) * 1e3:.1f} ms "
          f"(weights packed by {'the pack kernels' if kernels else 'torch'})", flush=True)
    tol, ok = TOLERANCES[spec.dtype], True
    gen = torch.Generator("cuda").manual_seed(0)
    for T in tokens:
        x = torch.randn(T, spec.hidden_size, generator=gen, device="cuda").to(getattr(torch, spec.dtype))
        lg = torch.randn(T, spec.num_experts, generator=gen, device="cuda")
        got = r(x, lg)
        got = got if isinstance(got, tuple) else (got,)
        want = moe_ref(spec, w, x, lg)
        want = want if isinstance(want, tuple) else (want,)
        errs = [rel_error(a, b) if T else 0.0 for a, b in zip(got, want)]
        good = all(e <= tol for e in errs)
        ok &= good
        print(f"  T={T:<5} err {' '.join(f'{e:.2e}' for e in errs)} tol {tol:.1e} {'ok' if good else 'FAIL'}", flush=True)
    if not PACK_CHECKED:
        PACK_CHECKED.append(root.parent.name)
        ok &= check_packing(r, w, spec)
    del r, w
    torch.cuda.empty_cache()
    return ok


results = {}
for root in sorted(ART.glob(f"*/{TARGET}")):
    name = root.parent.name
    if any(t in name for t in MULTI_RANK) or name.startswith("hf-") or (ONLY and name not in ONLY):
        continue
    spec = spec_from_dict(read_manifest(root)["spec"])
    t0 = time.time()
    try:
        if weight_bytes(spec) > REAL_BYTES:
            print(f"{name}: real size, {weight_bytes(spec) / 2**30:.1f} GiB of weights drawn on the GPU", flush=True)
            ok = verify_on_gpu(root, spec, TOKENS)
        else:
            ok = verify_artifact(root, TOKENS, device="cuda", echo=lambda s: print("  " + s, flush=True))
    except Exception as e:
        ok = False
        print("  ERROR", type(e).__name__, str(e)[:2000], flush=True)
    results[name] = ok
    print(f"{name}: {'PASS' if ok else 'FAIL'} ({time.time() - t0:.1f} s)", flush=True)
if not PACK_CHECKED:
    print("packing check: no real-size artifact in the bundle (deepseek-v3 is in scripts/specs)", flush=True)



def check_dispatch(root: Path) -> bool:
    """The multi-block dispatch (config.dispatch_tile: count, scan and place kernels) of every path of
    the artifact that has one, on random top-k ids, against reference.dispatch_ref exactly (every
    buffer), and its tile_counts scratch against reference.tile_counts_ref; with all experts local and
    with every third expert another rank's (expert_map -1)."""
    from moegen.reference import dispatch_ref, tile_counts_ref, tile_counts_size

    spec = spec_from_dict(read_manifest(root)["spec"])
    r = MoERunner.load(root, random_weights(spec, 2), device="cuda")
    E, El, K = spec.num_experts, spec.local_experts, spec.top_k
    foreign = torch.arange(E, dtype=torch.int32)
    foreign[::3] = -1
    foreign[foreign >= 0] = torch.arange(int((foreign >= 0).sum()), dtype=torch.int32)  # local ids < El
    ok = True
    for path in (p for p in r.paths if p["config"].get("dispatch_tile")):
        for T in sorted({min(T, spec.max_chunk_tokens) for T in (1, 7, 129, 1000, 4096)}):  # (one chunk)
            for emap in (r.expert_map.cpu(), foreign):
                b = r._staging(path, T)
                ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(torch.int32)
                b["ids"].copy_(ids)
                with r._stream():
                    r._dispatch(path, b, emap.cuda())
                want = dispatch_ref(ids, emap, El, path["config"]["block_m"])
                bad = [k for k, v in want.items() if not torch.equal(b[k].cpu(), v)]
                n = tile_counts_size(T, K, El, path["config"]["dispatch_tile"])
                if not torch.equal(b["tile_counts"][:n].cpu(), tile_counts_ref(ids, emap, El, path["config"]["dispatch_tile"])):
                    bad.append("tile_counts")
                ok &= not bad
                print(f"  dispatch {path['name']} T={T} {'EP map' if emap is foreign else 'local'}: "
                      f"{'FAIL ' + ','.join(bad) if bad else 'equal to dispatch_ref ok'}", flush=True)
    del r
    return ok


def check_route_dispatch(root: Path) -> bool:
    """The route_dispatch kernel of every path without the sort, alone, against reference.route_ref (ids
    exactly, weights to 1e-5) and dispatch_unsorted_ref (every buffer exactly), with a random correction
    bias, all experts local and every third another rank's: on random logits, on logits in steps of 0.5
    (ties everywhere: the lower index must win, as route_ref's topk), and on rows with NaN and -inf (only
    K distinct real experts asked: the expert kernels index weights with them)."""
    import tvm_ffi
    from moegen.reference import dispatch_unsorted_ref, route_ref
    from moegen.runtime.loader import load_artifact

    manifest, module = load_artifact(root, torch.device("cuda"))
    spec = spec_from_dict(manifest["spec"])
    E, K = spec.num_experts, spec.top_k
    foreign = torch.arange(E, dtype=torch.int32)
    foreign[::3] = -1
    foreign[foreign >= 0] = torch.arange(int((foreign >= 0).sum()), dtype=torch.int32)
    gen = torch.Generator().manual_seed(7)
    ok = True
    for path in (p for p in manifest["paths"] if not p["config"].get("sort", True)
                 and not p["config"].get("fused_routing")):  # (a fused kernel that routes has no route_dispatch)
        fn = module[f"route_dispatch_{path['name']}"]
        for T in (1, 2, 3, 7, 33):
            for kind in ("random", "ties", "nan"):
                lg = torch.randn(T, E, generator=gen)
                if kind == "ties":
                    lg = (lg * 2).round() / 2
                elif kind == "nan":
                    lg[0, ::5] = float("nan")
                    lg[-1, 1::3] = float("-inf")
                bias = torch.randn(E, generator=gen) * 0.1
                for emap in (torch.arange(E, dtype=torch.int32), foreign):
                    i32 = dict(dtype=torch.int32, device="cuda")
                    out = dict(ids=torch.full((T, K), -7, **i32), tw=torch.full((T, K), -7.0, device="cuda"),
                               sorted_ids=torch.full((T * K,), -7, **i32), block_expert=torch.full((T * K,), -7, **i32),
                               num_blocks=torch.full((1,), -7, **i32), slot_pos=torch.full((T * K,), -7, **i32))
                    with tvm_ffi.use_torch_stream():
                        fn(lg.cuda(), bias.cuda(), emap.cuda(), *out.values())
                    got = {k: v.cpu() for k, v in out.items()}
                    bad = []
                    if kind == "nan":  # no reference: K distinct real experts per token, weights written
                        if not all(len(set(r.tolist())) == K and min(r.tolist()) >= 0 and max(r.tolist()) < E
                                   for r in got["ids"]) or (got["tw"] == -7.0).any():
                            bad.append("ids")
                        want = dispatch_unsorted_ref(got["ids"], emap)
                    else:
                        ids, tw = route_ref(lg, spec.router, K, bias)
                        if not torch.equal(got["ids"], ids):
                            bad.append("ids")
                        if not torch.allclose(got["tw"], tw, rtol=1e-5, atol=1e-6):
                            bad.append(f"weights (max diff {(got['tw'] - tw).abs().max():.1e})")
                        want = dispatch_unsorted_ref(ids, emap)
                    bad += [k for k, v in want.items() if not torch.equal(got[k], v)]
                    ok &= not bad
                    if bad or T == 7:
                        print(f"  route_dispatch {path['name']} T={T} {kind} {'EP map' if emap is foreign else 'local'}: "
                              f"{'FAIL ' + ','.join(bad) if bad else 'equal to route_ref + dispatch_unsorted_ref ok'}",
                              flush=True)
    return ok


for root in sorted(ART.glob(f"*/{TARGET}")):
    manifest = read_manifest(root)
    spec = spec_from_dict(manifest["spec"])
    if any(not p["config"].get("sort", True) for p in manifest["paths"]) and "tp2" not in root.parent.name:
        results[f"{root.parent.name} (route_dispatch)"] = check_route_dispatch(root)
    if any(p["config"].get("dispatch_tile") for p in manifest["paths"]) and weight_bytes(spec) <= REAL_BYTES \
            and spec.parallel.tp_size * spec.parallel.ep_size == 1:
        results[f"{root.parent.name} (dispatch kernels)"] = check_dispatch(root)

# CUDA graph capture: replay equals eager; load + first forward (on the first small artifact there is)
root = next((r for r in (ART / n / TARGET for n in ("deepseek-v3-small", "tiny")) if r.exists()), None)
if root is None:
    print(json.dumps(results))
    raise SystemExit(0 if all(results.values()) else 1)
spec = spec_from_dict(read_manifest(root)["spec"])
w = random_weights(spec, 3)
t0 = time.perf_counter(); r = MoERunner.load(root, w, device="cuda")
x = torch.randn(33, spec.hidden_size, device="cuda").to(getattr(torch, spec.dtype)); lg = torch.randn(33, spec.num_experts, device="cuda")
out = r(x, lg); torch.cuda.synchronize()
print(f"load + first forward {(time.perf_counter() - t0) * 1e3:.1f} ms", flush=True)
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(2):
        r(x, lg)
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    gout = r(x, lg)
x.copy_(torch.randn_like(x)); g.replay(); torch.cuda.synchronize()
ref = r(x, lg)
print("cuda graph replay == eager on new inputs:", all(torch.equal(a, b) for a, b in zip(gout, ref)), flush=True)

# hidden_states that start mid-vector (a contiguous view 2 bytes into its buffer): the runner copies them,
# so every path gives the aligned input's result (session 10 stopped with a misaligned address at 64 tokens)
same = []
for T in (1, 64, 1000):
    xa = torch.randn(T, spec.hidden_size, device="cuda").to(getattr(torch, spec.dtype))
    la = torch.randn(T, spec.num_experts, device="cuda")
    a, m = r(xa, la), r(misaligned(xa), la)
    same.append(same_output(r, T, a, m))
print(f"misaligned hidden_states == aligned at 1, 64, 1000 tokens: {same}", flush=True)
results["misaligned hidden_states"] = all(same)

# EP without NCCL: every rank of an EP artifact on this one GPU (reduce_results=False), summed, against
# the single-rank reference; the decode path (no sort) skips the blocks of other ranks' experts there
for root in sorted(ART.glob(f"*ep2*/{TARGET}")):
    spec = spec_from_dict(read_manifest(root)["spec"])
    w = random_weights(spec, 5, device="cuda")
    ranks = [MoERunner.load(root, w, device="cuda", ep_rank=e, tp_rank=0, reduce_results=False)
             for e in range(spec.parallel.ep_size)] if spec.parallel.tp_size == 1 else []
    ok = bool(ranks)
    for T in (1, 3, 7, 64, 129, 1000):
        x = torch.randn(T, spec.hidden_size, device="cuda").to(getattr(torch, spec.dtype))
        lg = torch.randn(T, spec.num_experts, device="cuda")
        outs = [r(x, lg) for r in ranks]
        got = [sum(o[i] for o in outs) for i in range(len(outs[0]))] if isinstance(outs[0], tuple) else [sum(outs)]
        ref = moe_ref(spec, w, x, lg)
        ref = list(ref) if isinstance(ref, tuple) else [ref]
        errs = [rel_error(g.float(), f.float()) for g, f in zip(got, ref)]
        good = all(e <= TOLERANCES[spec.dtype] for e in errs)
        ok &= good
        path = pick_path(ranks[0].paths, T, spec.top_k, spec.local_experts)["name"]
        print(f"{root.parent.name} EP ranks on one GPU T={T} ({path}): err {max(errs):.2e} {'ok' if good else 'FAIL'}",
              flush=True)
    results[f"{root.parent.name} (EP ranks on one GPU)"] = ok
    del ranks
    torch.cuda.empty_cache()

# graph-replay timings, Qwen3-30B-A3B (bf16 and fp16)
for nm in ("qwen3-30b-a3b", "qwen3-30b-a3b-fp16"):
    root = ART / nm / TARGET
    if not root.exists():
        continue
    spec = spec_from_dict(read_manifest(root)["spec"])
    r = MoERunner.load(root, random_weights(spec, 1, device="cuda"), device="cuda")
    for T in (1, 16, 64, 256, 1024, 4096):
        x = torch.randn(T, spec.hidden_size, device="cuda").to(getattr(torch, spec.dtype))
        lg = torch.randn(T, spec.num_experts, device="cuda")
        for _ in range(3):
            r(x, lg)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            r(x, lg)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize(); n = 20; t0 = time.perf_counter()
        for _ in range(n):
            g.replay()
        torch.cuda.synchronize()
        print(f"{nm} T={T}: moegen graph replay {(time.perf_counter() - t0) / n * 1e6:.0f} us", flush=True)
print(json.dumps(results))
