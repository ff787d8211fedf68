"""2 x H100, NCCL: TP / EP runners equal the single-rank reference; all-reduced forward vs one GPU."""
import os, sys, time, torch, torch.distributed as dist, torch.multiprocessing as mp
from pathlib import Path
from moegen.runtime import MoERunner
from moegen.reference import random_weights, moe_ref
from moegen.spec import spec_from_dict
from moegen.artifact import read_manifest

ART = Path(os.environ.get("MOEGEN_GPU_ARTIFACTS", "gpu-bundle/artifacts"))

def graph_time(fn, n=20):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): fn()
    for _ in range(3): g.replay()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): g.replay()
    torch.cuda.synchronize(); return (time.perf_counter() - t0) / n * 1e6

def rel(a, b):
    a, b = a.float().cpu(), b.float().cpu(); return ((a - b).norm() / b.norm()).item()

def worker(rank, world):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    # sequence parallel: each rank its own tokens (5 and 3), reduce-scatter back
    root = ART / "ds-small-sp-tp2" / "cuda-sm90"
    spec = spec_from_dict(read_manifest(root)["spec"]); w = random_weights(spec, 6)
    r = MoERunner.load(root, w, device="cuda", tp_rank=rank, ep_rank=0)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(8, spec.hidden_size, generator=g).bfloat16(); lg = torch.randn(8, spec.num_experts, generator=g)
    mine = slice(0, 5) if rank == 0 else slice(5, 8)
    out = r(x[mine].cuda(), lg[mine].cuda(), sp_sizes=[5, 3])
    ref = moe_ref(spec, w, x, lg)
    errs = [rel(o, f[mine]) for o, f in zip(out, ref)]
    print(f"rank {rank} ds-small-sp-tp2 (NCCL reduce-scatter) tokens {mine}: rel err {['%.2e' % e for e in errs]} "
          f"{'ok' if max(errs) < 1.6e-2 else 'MISMATCH'}", flush=True)
    for name in ["ds-small-tp2", "ds-small-ep2-linear", "qwen3-tp2", "qwen3-ep2"]:
        root = ART / name / "cuda-sm90"
        spec = spec_from_dict(read_manifest(root)["spec"])
        w = random_weights(spec, 5)
        tp = spec.parallel.tp_size
        r = MoERunner.load(root, w, device="cuda", tp_rank=rank % tp, ep_rank=rank // tp,
                           shared_order="overlap" if spec.shared_experts else "before")
        for T in (1, 16, 256):
            g = torch.Generator().manual_seed(T)
            x = torch.randn(T, spec.hidden_size, generator=g).bfloat16(); lg = torch.randn(T, spec.num_experts, generator=g)
            out = r(x.cuda(), lg.cuda())
            if rank == 0:
                ref = moe_ref(spec, w, x, lg)
                outs = out if isinstance(out, tuple) else (out,); refs = ref if isinstance(ref, tuple) else (ref,)
                errs = [rel(o, f) for o, f in zip(outs, refs)]
                print(f"{name} T={T}: rel err {['%.2e' % e for e in errs]} {'ok' if max(errs) < 1.6e-2 else 'MISMATCH'}", flush=True)
        if name.startswith("qwen3"):
            for T in (1, 16, 256, 1024):
                x = torch.randn(T, spec.hidden_size, device="cuda").bfloat16(); lg = torch.randn(T, spec.num_experts, device="cuda")
                us = graph_time(lambda: r(x, lg))
                if rank == 0:
                    print(f"{name} T={T}: all-reduced forward on 2 GPUs {us:.0f} us (graph replay)", flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    # single GPU baseline + shared-expert overlap check on one GPU
    torch.cuda.set_device(0)
    root = ART / "qwen3-30b-a3b/cuda-sm90"
    spec = spec_from_dict(read_manifest(root)["spec"])
    r = MoERunner.load(root, random_weights(spec, 5), device="cuda")
    for T in (1, 16, 256, 1024):
        x = torch.randn(T, spec.hidden_size, device="cuda").bfloat16(); lg = torch.randn(T, spec.num_experts, device="cuda")
        print(f"qwen3 single GPU T={T}: {graph_time(lambda: r(x, lg)):.0f} us (graph replay)", flush=True)
    root = ART / "deepseek-v3-small/cuda-sm90"
    spec = spec_from_dict(read_manifest(root)["spec"]); w = random_weights(spec, 2)
    ra = MoERunner.load(root, w, device="cuda"); rb = MoERunner.load(root, w, device="cuda", shared_order="overlap")
    x = torch.randn(64, spec.hidden_size, device="cuda").bfloat16(); lg = torch.randn(64, spec.num_experts, device="cuda")
    a, b = ra(x, lg), rb(x, lg)
    print("overlap == before:", all(torch.equal(p, q) for p, q in zip(a, b)), flush=True)
    graph_time(lambda: rb(x, lg))
    print("overlap captured in a CUDA graph: ok", flush=True)
    # chunked (64-token chunks, staging reused) vs the reference on the GPU; inside a CUDA graph too
    root = ART / "tiny-chunk/cuda-sm90"
    spec = spec_from_dict(read_manifest(root)["spec"]); w = random_weights(spec, 3)
    r = MoERunner.load(root, w, device="cuda")
    x = torch.randn(1000, spec.hidden_size).bfloat16(); lg = torch.randn(1000, spec.num_experts)
    print(f"chunked (16 x 64 tokens) vs reference: rel err {rel(r(x.cuda(), lg.cuda()), moe_ref(spec, w, x, lg)):.2e}", flush=True)
    # the custom op under torch.compile(fullgraph=True) on the GPU
    root = ART / "deepseek-v3-small/cuda-sm90"
    spec = spec_from_dict(read_manifest(root)["spec"]); r = MoERunner.load(root, random_weights(spec, 2), device="cuda")
    f = r.as_op("gpu.ds")
    proj = torch.nn.Linear(spec.hidden_size, spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    def model(x, lg):
        s_, r_ = f(proj(x), lg); return x + s_ + r_
    x = torch.randn(33, spec.hidden_size, device="cuda").bfloat16(); lg = torch.randn(33, spec.num_experts, device="cuda")
    with torch.no_grad():
        e = model(x, lg); c = torch.compile(model, fullgraph=True)(x, lg)
    print(f"torch.compile(fullgraph) == eager on the GPU: max diff {(e.float() - c.float()).abs().max().item():.3e}", flush=True)
    mp.spawn(worker, args=(2,), nprocs=2, join=True)
