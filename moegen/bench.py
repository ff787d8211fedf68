"""`moegen bench`: time moegen against the contenders of a target family, next to the floor measured in
the same run.

Shape legend: T tokens, E experts, K top-k, H hidden, Hr routed width (L with a latent transform, else H),
I intermediate per expert, N13 = 2I (gated) | I rows of w13, L latent width, Is shared intermediate.

Method (shared/DESIGN.md, "Performance method"):
  1. ceilings, once per run, before any shape: copy bandwidth (bytes read + written) and bf16 GEMM rate;
  2. per shape: build the artifact (or reuse an up-to-date one), generate real-size random weights once,
     load the runner once;
  3. per token count: fresh random hidden_states [T, H] and router logits [T, E]; time every contender
     (median of `repeats` after warm-ups); floor = max(bytes touched / bandwidth, FLOPs / GEMM rate),
     where the bytes are those of the experts that THIS input's routing selects.

Contenders per target family live in CONTENDERS; "moegen" is always first, the others are baselines
(`moegen % of floor` and `x vs <baseline>` are reported for each). Only the CPU family exists so far;
the CUDA family (CUDA graphs, torch._grouped_mm, the Triton baseline) plugs in beside it.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .artifact import ArtifactError, read_manifest
from .reference import activation_ref, route_ref
from .spec import MoESpec, SpecError, load_spec, weights_contract
from .targets import load_target

REPO = Path(__file__).resolve().parents[1]
SPECS_DIR = REPO / "examples" / "specs"
# what an artifact is built from: a newer file here makes bench rebuild rather than reuse
BUILD_INPUTS = ("moegen/build.py", "moegen/kernels", "moegen/schedule", "moegen/targets.py", "schedules", "targets")

COPY_BYTES = 512 << 20  # the copy ceiling's source tensor: far larger than any cache level
GEMM_SIZE = 2048  # the GEMM ceiling's M = N = K: large enough to reach the CPU's bf16 peak
CEILING_TRIES = 10  # best of this many timed runs (after one warm-up): rides out bursts of a shared box
WARMUPS = 2  # untimed calls per contender and cell before the `repeats` timed ones
WEIGHTS_SEED = 0
INPUTS_SEED = 1
BIAS_STD = 0.1  # biases (and correction bias): as moegen.reference.random_weights
FLUSH_LLC_MULTIPLE = 2  # the cache flush reads (or writes) this many times the last-level cache before each call
FLUSH_MODES = ("read", "write")  # CacheFlush here, L2Flush in bench_cuda
FLUSH_DEFAULT_BYTES = 512 << 20  # ... or this much when sysfs does not say how large that cache is
FLUSH_SETTLE_S = 0.01  # pause after the flush: torch's OpenMP workers spin a while after a parallel region
#                       and would compete with the next contender's threads (TVM's pool) on 2 cores
BUSY_LOAD = 0.25  # load average per CPU above which the run warns that the box is shared
PER_EXPERT = ("w13", "w2", "w13_bias", "w2_bias")  # contract names whose first dim is E


# ---- ceilings ----------------------------------------------------------------------------------


def _best_seconds(fn: Callable[[], object], tries: int = CEILING_TRIES) -> float:
    fn()  # warm-up: first-touch page faults, oneDNN kernel selection
    best = math.inf
    for _ in range(tries):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16 GEMM rate (FLOP/s) on this machine,
    with torch's threads (the runner's TVM pool uses as many: moegen.runtime.loader)."""
    n = COPY_BYTES // 2  # bf16 elements
    src = torch.ones(n, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(GEMM_SIZE, GEMM_SIZE).to(torch.bfloat16)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE).to(torch.bfloat16)
    gemm_s = _best_seconds(lambda: torch.matmul(a, b))
    return {
        "copy_bytes_per_s": 2 * COPY_BYTES / copy_s,  # read + written
        "copy_tensor_bytes": COPY_BYTES,
        "gemm_flops_per_s": 2 * GEMM_SIZE ** 3 / gemm_s,
        "gemm_size": GEMM_SIZE,
        "gemm_dtype": "bfloat16",
        "tries": CEILING_TRIES,
        "threads": torch.get_num_threads(),
    }


# ---- the floor ---------------------------------------------------------------------------------


def _numel(shape) -> int:
    return math.prod(shape)


def floor_terms(spec: MoESpec, topk_ids: torch.Tensor) -> tuple[int, int]:
    """(bytes touched, FLOPs) of one forward whose routing chose topk_ids [T, K].

    Bytes: the weights of the unique experts selected (w13 + w2 + biases, unpadded contract shapes),
    every weight that is not per-expert (shared experts, latent projection, correction bias), and the
    activations in (hidden_states, fp32 logits) and out. FLOPs: 2 * T*K * (N13*Hr + Hr*I) for the
    routed experts, plus the dense shared MLP and latent projection when the spec has them.
    """
    T, K = topk_ids.shape
    contract = weights_contract(spec)
    elt = torch.tensor([], dtype=getattr(torch, spec.dtype)).element_size()
    per_expert = sum(_numel(shape[1:]) * elt for name, (shape, _) in contract.items() if name in PER_EXPERT)
    dense = sum(_numel(shape) * torch.tensor([], dtype=getattr(torch, dt)).element_size()
                for name, (shape, dt) in contract.items() if name not in PER_EXPERT)
    experts = int(torch.unique(topk_ids).numel())
    H, Hr, I, E = spec.hidden_size, spec.routed_width, spec.intermediate_size, spec.num_experts
    out_width = Hr + (H if spec.shared_experts is not None else 0)
    act_bytes = T * H * elt + T * E * 4 + T * out_width * elt  # x in, fp32 logits in, outputs
    nbytes = experts * per_expert + dense + act_bytes
    flops = 2 * T * K * (spec.w13_rows * Hr + Hr * I)
    if spec.shared_experts is not None:
        Is = spec.shared_experts.intermediate_size
        flops += 2 * T * ((2 if spec.gated else 1) * Is * H + H * Is)
    if spec.latent_size is not None:
        flops += 2 * T * spec.latent_size * H
    return nbytes, flops


# ---- inputs and weights ------------------------------------------------------------------------


def bench_weights(spec: MoESpec, seed: int = WEIGHTS_SEED) -> dict[str, torch.Tensor]:
    """Real-size random weights under the contract (full, unsharded; spec dtype), filled in place expert
    by expert so no fp32 copy of a whole weight ever exists (Mixtral-8x7B's are 2.6 GiB in bf16).
    Matrices ~ N(0, 1/fan_in) so activations stay O(1); vectors ~ N(0, BIAS_STD^2)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, dtype) in weights_contract(spec).items():
        t = torch.empty(shape, dtype=getattr(torch, dtype))
        std = shape[-1] ** -0.5 if len(shape) - (name in PER_EXPERT) >= 2 else BIAS_STD
        for part in (t.unbind(0) if name in PER_EXPERT else (t,)):
            part.normal_(0.0, std, generator=g)
        out[name] = t
    return out


def bench_inputs(spec: MoESpec, T: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden_states [T, H] (spec dtype), router logits [T, E] fp32 (standard normal: random routing)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, spec.hidden_size, generator=g).to(getattr(torch, spec.dtype))
    logits = torch.randn(T, spec.num_experts, generator=g)
    return x, logits


# ---- contenders --------------------------------------------------------------------------------


def eager_moe(spec: MoESpec, weights: dict[str, torch.Tensor], x: torch.Tensor, logits: torch.Tensor):
    """The eager per-expert loop of HF transformers / vLLM's fallback, all matmuls in the spec dtype.

    x [T, H], logits [T, E] fp32 -> routed [T, Hr], or (shared [T, H], routed [T, Hr]) as the runner.
    Routing in fp32 (softmax/sigmoid, top-k, renormalize: moegen.reference.route_ref), weights cast to
    the activation dtype; then for each expert hit: x_e @ w13[e].T -> act -> @ w2[e].T, weighted, and
    index_add into the output.
    """
    dt = x.dtype
    xr = F.linear(x, weights["latent_proj"]) if spec.latent_size is not None else x  # [T, Hr]
    ids, w = route_ref(logits, spec.router, spec.top_k, weights.get("e_score_correction_bias"))  # [T, K]
    w = w.to(dt)
    routed = torch.zeros(x.shape[0], spec.routed_width, dtype=dt)
    expert_mask = F.one_hot(ids.long(), spec.num_experts).permute(2, 1, 0)  # [E, K, T]
    hit = torch.nonzero(expert_mask.sum((-1, -2)) > 0).flatten().tolist()
    bias = spec.expert_bias
    for e in hit:
        k_idx, tok = torch.where(expert_mask[e])  # the slots routed to expert e
        xe = xr[tok]  # [Te, Hr]
        we = w[tok, k_idx, None]  # [Te, 1]
        if spec.router.apply_weight_on_input:
            xe = xe * we
        gu = F.linear(xe, weights["w13"][e], weights["w13_bias"][e] if bias else None)  # [Te, N13]
        act = activation_ref(gu, spec.activation, spec.swiglu_alpha, spec.swiglu_limit)  # [Te, I]
        y = F.linear(act, weights["w2"][e], weights["w2_bias"][e] if bias else None)  # [Te, Hr]
        routed.index_add_(0, tok, y if spec.router.apply_weight_on_input else y * we)
    if spec.shared_experts is None:
        return routed
    shared = F.linear(activation_ref(F.linear(x, weights["shared_w13"]), spec.activation, spec.swiglu_alpha,
                                     spec.swiglu_limit), weights["shared_w2"])  # [T, H]
    if spec.shared_experts.gate == "sigmoid":
        shared = shared * torch.sigmoid(F.linear(x, weights["shared_gate"]))
    return shared, routed


def cpu_contenders(spec, weights, runner) -> dict[str, Callable]:
    """name -> fn(x, logits): moegen first, then the baselines."""
    return {"moegen": runner.forward, "eager": lambda x, logits: eager_moe(spec, weights, x, logits)}


# family -> (spec, weights, runner) -> {name: fn(x, logits)}, "moegen" first. cuda goes here (graphs,
# torch._grouped_mm, Triton fused) once the CUDA runner exists.
CONTENDERS: dict[str, Callable[..., dict[str, Callable]]] = {"cpu": cpu_contenders}


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache (Linux sysfs), None when unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            v = f.read_text().strip()
            sizes.append(int(v[:-1]) << {"K": 10, "M": 20, "G": 30}[v[-1]] if v[-1] in "KMG" else int(v))
        except (OSError, ValueError):
            pass
    return max(sizes) if sizes else None


class CacheFlush:
    """Evicts the weights from the CPU caches before each timed call: a real decode step reaches a layer
    after every other layer's weights went through the cache, and this box's L3 (260 MiB) would otherwise
    hold a whole T=1 working set of Qwen3 or gpt-oss and time it above the DRAM floor.
    mode "read" sums the buffer: the cache then holds clean lines, as after the layer before (its
    weights). "write" (sessions 1-9) rewrote it, leaving dirty lines whose write-back the timed call paid
    as it evicted them (the same effect cost the H100 bench ~9 us of Qwen3's one-token layer; docs/perf.md)."""

    def __init__(self, mode: str = "read", nbytes: int | None = None):
        if mode not in FLUSH_MODES:
            raise SpecError("--cache-flush", mode, " | ".join(FLUSH_MODES))
        llc = last_level_cache_bytes()
        self.mode = mode
        self.nbytes = nbytes or (FLUSH_LLC_MULTIPLE * llc if llc else FLUSH_DEFAULT_BYTES)
        self.buf = torch.ones(self.nbytes // 8, dtype=torch.int64)

    def __call__(self) -> None:
        if self.mode == "write":
            self.buf.add_(1)  # read + write every line: evicts whatever was cached before, leaves it dirty
        else:
            self.buf.sum()  # every line read, nothing written back
        time.sleep(FLUSH_SETTLE_S)


def _time_us(fn: Callable[[], object], repeats: int, flush: Callable[[], None] = lambda: None) -> float:
    """Median wall time in µs of `repeats` calls after WARMUPS untimed ones (CPU: calls are synchronous);
    `flush` runs, untimed, before every call."""
    for _ in range(WARMUPS):
        flush()
        fn()
    times = []
    for _ in range(repeats):
        flush()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _flat(out) -> torch.Tensor:
    return torch.cat([o.float().flatten() for o in out]) if isinstance(out, tuple) else out.float().flatten()


def rel_err(got, want) -> float:
    """Relative L2 norm of got - want (both a tensor or a (shared, routed) tuple), as verify measures."""
    from .verify import rel_error

    return rel_error(_flat(got), _flat(want))


# ---- artifacts ---------------------------------------------------------------------------------


def _stale_reason(spec: MoESpec, target, path: Path, manifest: dict) -> str | None:
    """None when the artifact at `path` was built from this spec, with this TVM and today's schedules,
    after the last change to any source of the build (kernels, schedules, lowering, targets)."""
    import tvm

    from .build import expert_shapes
    from .schedule.config import load_paths, path_records

    if manifest["spec_hash"] != spec.hash:
        return f"spec {manifest['spec_hash']} != {spec.hash}"
    if manifest.get("tvm_version") != tvm.__version__:
        return f"TVM {manifest.get('tvm_version')} != {tvm.__version__}"
    shapes = expert_shapes(spec)
    want = path_records(load_paths(target.name, shapes=shapes), shapes)  # the shipped schedules file
    if manifest["paths"] != want:
        return f"the schedules for {target.name} changed"
    built = (path / "manifest.json").stat().st_mtime
    for src in BUILD_INPUTS:
        root = REPO / src
        for f in sorted(root.rglob("*")) if root.is_dir() else [root] if root.is_file() else []:
            if f.suffix in (".py", ".yaml") and f.stat().st_mtime > built:
                return f"{f.relative_to(REPO)} is newer than the artifact"
    return None


def ensure_artifact(spec: MoESpec, target, out_dir: Path, echo: Callable[[str], None]) -> tuple[Path, bool]:
    """out_dir/<spec>/<target>, reused when up to date (spec hash, TVM version, path configs, no newer build
    source), else built without golden data (real-size golden weights would dominate the run).
    Returns (path, reused)."""
    path = Path(out_dir) / spec.name / target.name
    if (path / "manifest.json").exists():
        try:
            why = _stale_reason(spec, target, path, read_manifest(path))
        except ArtifactError as e:
            why = str(e)
        if why is None:
            echo(f"  artifact {path}: reused (spec {spec.hash})")
            return path, True
        echo(f"  artifact {path}: rebuilding ({why})")
    from .build import build

    t0 = time.perf_counter()
    path = build(spec, target.name, Path(out_dir), golden=False, progress=lambda m: echo(f"    {m}"))
    echo(f"  artifact {path}: built in {time.perf_counter() - t0:.1f} s")
    return path, False


def _spec_for(name: str) -> MoESpec:
    """A shape name (examples/specs/<name>.yaml) or a path to a spec file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        return load_spec(p)
    p = SPECS_DIR / f"{name}.yaml"
    if not p.is_file():
        raise SpecError("--shapes", name, " | ".join(sorted(q.stem for q in SPECS_DIR.glob("*.yaml"))))
    return load_spec(p)


# ---- report ------------------------------------------------------------------------------------


def _tvm_pool_threads() -> int | None:
    """Threads of the TVM pool that runs moegen's CPU kernels (None when no TVM runtime is loaded)."""
    import tvm_ffi

    f = tvm_ffi.get_global_func("runtime.NumThreads", allow_missing=True)
    return int(f()) if f is not None else None


def machine_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from . import __version__

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_model": model, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"), "torch": torch.__version__,
            "python": platform.python_version(), "moegen": __version__,
            "loadavg_1min_at_start": os.getloadavg()[0]}


def format_table(rows: list[dict], contenders: list[str]) -> str:
    base = [c for c in contenders if c != "moegen"]
    head = (["shape", "T", "path", "floor µs"] + [f"{c} µs" for c in base] + ["moegen µs", "moegen % floor"]
            + [f"× vs {c}" for c in base] + ["rel err"])
    lines = []
    for r in rows:
        us = r["us"]
        lines.append([r["shape"], str(r["tokens"]), r["path"], f"{r['floor_us']:.0f}"]
                     + [f"{us[c]:.0f}" for c in base] + [f"{us['moegen']:.0f}", f"{r['moegen_pct_of_floor']:.0f}%"]
                     + [f"{r['speedup'][c]:.2f}×" for c in base]
                     + ["-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"])
    table = [head, None] + lines  # None: the rule under the header
    widths = [max(len(cells[i]) for cells in table if cells) for i in range(len(head))]

    def fmt(cells):  # text columns (shape, T, path) left, numbers right
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join(fmt(cells) if cells else fmt(["-" * w for w in widths]) for cells in table)


def _ceilings_line(c: dict) -> str:
    return (f"ceilings: copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + written, "
            f"{c['copy_tensor_bytes'] >> 20} MiB), bf16 GEMM {c['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s "
            f"({c['gemm_size']}³), {c['threads']} threads")


# ---- the run -----------------------------------------------------------------------------------


def run_bench(target: str, shapes: list[str], tokens: list[int], out_dir: Path, *, json_path=None,
              repeats: int = 5, cache_flush: str = "read", echo: Callable[[str], None] = print) -> list[dict]:
    """Benchmark every shape (examples/specs/<name>.yaml) at every token count on `target`.

    Returns one row per (shape, T): floor_us, us {contender: median µs}, moegen_pct_of_floor,
    speedup {baseline: baseline µs / moegen µs}, rel_err (moegen vs the first baseline), path, bytes, flops.
    Writes rows, ceilings and machine info to json_path (after every shape, so a long run leaves its part).
    cache_flush: CacheFlush's mode.
    """
    from .runtime.runner import MoERunner, pick_path

    flush = CacheFlush(cache_flush)  # (checks the mode before anything runs)
    tgt = load_target(target)
    if tgt.family not in CONTENDERS:
        raise SpecError("--target", target, f"a target of family {' | '.join(CONTENDERS)} "
                                            f"(bench for {tgt.family} targets is not written yet)")
    if repeats < 1:
        raise SpecError("--repeats", repeats, "an integer >= 1")
    specs = [_spec_for(s) for s in shapes]  # every name checked before the long part starts
    for spec in specs:
        if spec.parallel.tp_size * spec.parallel.ep_size > 1:
            raise SpecError("parallel", f"{spec.name}: tp {spec.parallel.tp_size} ep {spec.parallel.ep_size}",
                            "tp_size = ep_size = 1 (bench times one unsharded layer)")
    load = os.getloadavg()[0]
    if load > BUSY_LOAD * (os.cpu_count() or 1):
        echo(f"warning: load average {load:.2f} on {os.cpu_count()} CPUs before the run: another job shares "
             "them, and a parallel region whose thread is descheduled waits a whole time slice (ms), so "
             "every number (eager most) will be off; run on a quiet machine")
    echo(f"measuring ceilings ({torch.get_num_threads()} threads)")
    ceilings = measure_ceilings()
    echo(_ceilings_line(ceilings))
    echo(f"timing: median of {repeats} calls after {WARMUPS} warm-ups, caches flushed before each call "
         f"({flush.nbytes >> 20} MiB {'written' if flush.mode == 'write' else 'read'})")
    report = {"target": tgt.name, "ceilings": ceilings, "machine": machine_info(), "repeats": repeats,
              "warmups": WARMUPS, "cache_flush_bytes": flush.nbytes, "cache_flush": flush.mode, "shapes": {},
              "rows": []}
    rows: list[dict] = report["rows"]
    names: list[str] = []

    def dump():
        if json_path is not None:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(report, indent=1) + "\n")

    for spec in specs:
        echo(f"{spec.name}: E={spec.num_experts} K={spec.top_k} H={spec.hidden_size} "
             f"I={spec.intermediate_size} {spec.dtype} {spec.activation}")
        path, reused = ensure_artifact(spec, tgt, out_dir, echo)
        t0 = time.perf_counter()
        weights = bench_weights(spec)
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner = MoERunner.load(path, weights, device="cpu")
        load_s = time.perf_counter() - t0
        report["machine"]["tvm_pool_threads"] = _tvm_pool_threads()
        echo(f"  weights {nbytes / 2**30:.2f} GiB generated in {gen_s:.1f} s; runner loaded in {load_s:.1f} s")
        report["shapes"][spec.name] = {"artifact": str(path), "reused": reused, "spec_hash": spec.hash,
                                       "weights_bytes": nbytes, "weights_seconds": round(gen_s, 2),
                                       "load_seconds": round(load_s, 2)}
        contenders = CONTENDERS[tgt.family](spec, weights, runner)
        names = list(contenders)
        baselines = names[1:]
        outs = None
        for T in tokens:
            if T == 0:
                echo("  T=0: skipped (nothing to time)")
                continue
            x, logits = bench_inputs(spec, T, seed=INPUTS_SEED + T)
            outs = {n: fn(x, logits) for n, fn in contenders.items()}  # one call each, to compare
            us = {n: _time_us(lambda fn=fn: fn(x, logits), repeats, flush) for n, fn in contenders.items()}
            ids, _ = route_ref(logits, spec.router, spec.top_k, weights.get("e_score_correction_bias"))
            b, fl = floor_terms(spec, ids)
            floor_us = max(b / ceilings["copy_bytes_per_s"], fl / ceilings["gemm_flops_per_s"]) * 1e6
            row = {"shape": spec.name, "tokens": T, "path": pick_path(runner.paths, T, spec.top_k, spec.local_experts)["name"],
                   "experts_touched": int(torch.unique(ids).numel()), "bytes": b, "flops": fl,
                   "floor_us": floor_us, "us": us, "moegen_pct_of_floor": floor_us / us["moegen"] * 100,
                   "speedup": {c: us[c] / us["moegen"] for c in baselines},
                   "rel_err": rel_err(outs["moegen"], outs[baselines[0]]) if baselines else None}
            rows.append(row)
            echo(f"  T={T}: floor {floor_us:.0f} µs, " + ", ".join(f"{n} {us[n]:.0f} µs" for n in names)
                 + f" ({row['moegen_pct_of_floor']:.0f}% of floor)")
        dump()
        del contenders, runner, weights, outs
        gc.collect()  # Mixtral's weights and packed copies: give them back before the next shape
    report["machine"]["loadavg_1min_at_end"] = os.getloadavg()[0]
    dump()
    echo("")
    echo(_ceilings_line(ceilings))
    if rows:
        echo(format_table(rows, names))
    return rows
