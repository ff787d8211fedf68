"""`moegen bench --target cuda-sm90`: time moegen's prebuilt CUDA artifacts against two eager torch loops,
torch._grouped_mm and a Triton fused-MoE, under CUDA graphs, next to the floor measured in the same run
(contenders: moegen.baselines.torch_moe and triton_moe).

Shape legend: T tokens, E experts, K top-k, H hidden, Hr routed width, I intermediate per expert,
N13 = 2I (gated) | I rows of w13, S = T*K routed slots.

Runs on a GPU box with torch (+ triton for the Triton contender), tvm-ffi, click and pyyaml: this module
and everything it imports never import tvm; the artifacts come prebuilt (`make gpu-bundle`).

Method:
  1. ceilings, once per run, each from back-to-back calls over CEILING_SECONDS timed by CUDA events (at
     least CEILING_TRIES): device copy bandwidth (a COPY_BYTES bf16 `copy_`, bytes read + written per
     second), the best call; the dense bf16 GEMM rate (torch.matmul GEMM_SIZE^3), the median call. A floor
     takes the highest rate the card sustains over a series as long as a cell's: its memory rate holds
     (median within 3% of the best, and read-heavy cells already reach 100% of the best call's floor),
     its GEMM rate does not: at the 700 W power cap an H100's clock drops within a second (run 50,
     docs/perf.md: 784 TFLOP/s best, 654 median over 3 s, 561 in the last calls), so a best-call GEMM
     ceiling sets a floor no sustained series reaches. Both statistics of both are kept.
  2. per shape: real-size random weights made on the GPU (N(0, 1/fan_in), biases N(0, BIAS_STD^2));
     MoERunner.load of <artifacts>/<shape>/<target> and its first forward, timed together (synchronised);
     every contender run once at CHECK_TOKENS tokens and compared with moegen.reference.moe_ref (fp32).
  3. per token count T: random x [T, H] (bf16) and router logits [T, E] (fp32). Each contender runs
     WARMUPS times on a side stream (Triton compiles there), is captured once in a CUDA graph, and the
     graph is replayed: `us` = median of repeats x replays single replays, each after an L2 flush (a
     read of twice the L2: see L2Flush) and timed alone by CUDA events; `us_hot` = median over repeats of `replays`
     back-to-back replays. A contender slower than TIME_BUDGET_S per series gets fewer replays (at
     least MIN_TIMED; `timed_replays`). The graph's output after the last replay is compared with moe_ref at this T
     (rel err: relative L2): above the dtype's tolerance the contender is flagged (`ok` false, "!").
     Triton: every config of the T bucket is timed (one repeat) and checked; the fastest correct one is
     timed as the other contenders.
  4. floor = max(bytes / copy bandwidth, FLOPs / GEMM rate) (moegen.bench.floor_terms): the weights of
     the experts THIS routing touches + non-expert weights + activations; FLOPs 2*T*K*(N13*Hr + Hr*I)
     (+ shared experts). "% of floor" = floor / time.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .artifact import TOLERANCES, ArtifactError, read_manifest
from .bench import BIAS_STD, FLUSH_MODES, PER_EXPERT, floor_terms, rel_err
from .spec import MoESpec, SpecError, load_spec, spec_from_dict, weights_contract

REPO = Path(__file__).resolve().parents[1]
SPEC_DIRS = (REPO / "scripts" / "specs", REPO / "examples" / "specs")  # where a shape name without artifact is looked up
DEFAULT_ARTIFACTS = "gpu-bundle/artifacts"
DEFAULT_SHAPES = ("mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v3")
DEFAULT_TOKENS = (1, 16, 64, 256, 1024, 4096)
# moegen, then the baselines (moegen.baselines): eager = the capturable dense per-expert loop, eager_hf =
# HF's loop over the hit experts (planned on the host per input), grouped_mm, triton = the fused MoE sweep
CONTENDERS = ("moegen", "eager", "eager_hf", "grouped_mm", "triton")

COPY_BYTES = 1 << 30  # the copy ceiling's source tensor: 20x the H100's 50 MiB L2
GEMM_SIZE = 8192  # the GEMM ceiling's M = N = K: reaches the bf16 tensor-core peak
CEILING_TRIES = 10  # at least this many timed calls per ceiling, after CEILING_WARMUPS untimed ones (clocks ramp up) ...
CEILING_WARMUPS = 3
CEILING_SECONDS = 1.0  # ... and calls until this long has passed: a ceiling is their median (see the method)
WARMUPS = 2  # untimed calls per contender and cell before the capture (Triton compiles in the first)
DEFAULT_REPEATS = 5
DEFAULT_REPLAYS = 10
TIME_BUDGET_S = 1.0  # at most about this long per contender and cell for each of the cold and hot series:
#                      a contender slower than TIME_BUDGET_S / (repeats * replays) gets fewer replays ...
MIN_TIMED = 3  # ... but never fewer than this (a median of at least 3)
L2_FLUSH_MULTIPLE = 2  # the flush reads (or writes) this many times the L2 before each timed replay
L2_DEFAULT_BYTES = 50 << 20  # ... of this L2 size when torch does not report it (H100: 50 MiB)
CHECK_TOKENS = 5  # the correctness check of every contender before a shape's timings
WEIGHTS_SEED = 0
INPUTS_SEED = 1  # cell inputs use INPUTS_SEED + T
SCHEMA = "moegen.bench-cuda/1"
US_PER_S = 1e6


class BenchUnavailable(RuntimeError):
    """The CUDA bench cannot run on this machine (no GPU): one line, the CLI exits 2."""


# ---- ceilings ----------------------------------------------------------------------------------


def _gpu_seconds(fn: Callable[[], object], seconds: float = CEILING_SECONDS) -> tuple[float, float, int]:
    """(median, best, calls): fn timed by CUDA events, call after call, for at least CEILING_TRIES calls and
    `seconds` of wall time, after CEILING_WARMUPS untimed calls."""
    for _ in range(CEILING_WARMUPS):
        fn()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < CEILING_TRIES or time.perf_counter() < deadline:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), min(times), len(times)


def measure_ceilings(device: torch.device, seconds: float = CEILING_SECONDS) -> dict:
    """Device copy bandwidth (bytes read + written per second; the best call, `_median` too) and dense bf16
    GEMM rate (FLOP/s; the median call, `_best` too): see the method."""
    src = torch.ones(COPY_BYTES // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_s, copy_best, copy_n = _gpu_seconds(lambda: dst.copy_(src), seconds)
    del src, dst
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, generator=g).to(torch.bfloat16)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE, device=device, generator=g).to(torch.bfloat16)
    c = torch.empty(GEMM_SIZE, GEMM_SIZE, device=device, dtype=torch.bfloat16)
    gemm_s, gemm_best, gemm_n = _gpu_seconds(lambda: torch.matmul(a, b, out=c), seconds)
    del a, b, c
    torch.cuda.empty_cache()
    copy_bytes, gemm_flops = 2 * COPY_BYTES, 2 * GEMM_SIZE ** 3
    return {"copy_bytes_per_s": copy_bytes / copy_best, "copy_bytes_per_s_median": copy_bytes / copy_s,
            "copy_tensor_bytes": COPY_BYTES, "gemm_flops_per_s": gemm_flops / gemm_s,
            "gemm_flops_per_s_best": gemm_flops / gemm_best, "gemm_size": GEMM_SIZE, "gemm_dtype": "bfloat16",
            "statistic": {"copy": "best", "gemm": "median"}, "seconds": seconds,
            "calls": {"copy": copy_n, "gemm": gemm_n}}


# ---- the floor ---------------------------------------------------------------------------------


def expected_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Distinct experts T tokens touch on average when each picks K of E uniformly at random."""
    return num_experts * (1 - (1 - top_k / num_experts) ** num_tokens)


def cell_floor(spec: MoESpec, topk_ids: torch.Tensor, ceilings: dict) -> dict:
    """The floor of one cell from the routing it actually got: bytes, FLOPs, arithmetic intensity,
    the floor in µs and which ceiling sets it."""
    nbytes, flops = floor_terms(spec, topk_ids.cpu())
    bw_us = nbytes / ceilings["copy_bytes_per_s"] * US_PER_S
    fl_us = flops / ceilings["gemm_flops_per_s"] * US_PER_S
    T, K = topk_ids.shape
    return {"experts_touched": int(torch.unique(topk_ids.cpu()).numel()),
            "experts_expected": round(expected_experts(spec.num_experts, K, T), 2),
            "bytes": nbytes, "flops": flops, "intensity": flops / nbytes,
            "floor_us": max(bw_us, fl_us), "bound": "bandwidth" if bw_us >= fl_us else "compute"}


# ---- weights, inputs, reference ----------------------------------------------------------------


def device_weights(spec: MoESpec, device, seed: int = WEIGHTS_SEED) -> dict[str, torch.Tensor]:
    """Real-size random weights under the contract, made on `device` in the spec dtype (no fp32 copy:
    DeepSeek-V3's 256 experts are 11 GB of bf16). Same distributions as moegen.bench.bench_weights."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, (shape, dtype) in weights_contract(spec).items():
        t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        std = shape[-1] ** -0.5 if len(shape) - (name in PER_EXPERT) >= 2 else BIAS_STD
        out[name] = t.normal_(0.0, std, generator=g)
    return out


def cell_inputs(spec: MoESpec, T: int, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden_states [T, H] (spec dtype), router logits [T, E] fp32 (standard normal: random routing)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(T, spec.hidden_size, generator=g, device=device).to(getattr(torch, spec.dtype))
    return x, torch.randn(T, spec.num_experts, generator=g, device=device)


def reference(spec: MoESpec, weights: dict[str, torch.Tensor], x: torch.Tensor, logits: torch.Tensor):
    """moegen.reference.moe_ref (fp32) on the inputs' device (its buffers follow the default device)."""
    from .reference import moe_ref

    with torch.device(x.device):
        return moe_ref(spec, weights, x, logits)


def make_contender(name: str, spec: MoESpec, weights: dict, runner, logits: torch.Tensor, triton_cfg=None):
    """fn(x, logits) for one contender at one cell (the eager loop plans from these logits)."""
    from .baselines import torch_moe

    if name == "moegen":
        if runner is None:
            raise BenchUnavailable("no moegen artifact for this shape")
        return runner.forward
    if name == "eager":
        return lambda x, lg: torch_moe.dense_loop_moe(spec, weights, x, lg)
    if name == "eager_hf":
        return torch_moe.EagerLoop(spec, weights).plan(logits)
    if name == "grouped_mm":
        return lambda x, lg: torch_moe.grouped_mm_moe(spec, weights, x, lg)
    if name == "triton":
        return torch_moe.triton_moe(spec, weights, triton_cfg)
    raise ValueError(name)


# ---- timing ------------------------------------------------------------------------------------


class L2Flush:
    """Evicts the L2 before a timed replay: a decode step reaches a layer after every other layer's
    weights went through the cache, and the H100's 50 MiB would otherwise hold a small working set.

    mode "read" (the default since session 9) reads twice the L2, so the cache is left holding clean
    lines, as after the previous layer's weights. mode "write" (sessions 1-8) writes zeros over it
    instead, which leaves the L2 full of dirty lines: the timed replay then pays for writing those back
    to memory as its own reads evict them, up to a full L2 of write traffic no layer of a model causes
    (H100, Qwen3-30B-A3B at one token: 49.5 us after a write, 40.5 after a read; docs/perf.md)."""

    def __init__(self, device: torch.device, mode: str = "read"):
        if mode not in FLUSH_MODES:
            raise SpecError("--l2-flush", mode, " | ".join(FLUSH_MODES))
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or L2_DEFAULT_BYTES
        self.mode = mode
        self.nbytes = L2_FLUSH_MULTIPLE * l2
        self.buf = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        self.buf.fill_(1)  # a read of it must not see NaNs or trip on uninitialised memory
        self._max = torch.empty((), dtype=torch.float16, device=device)

    def __call__(self) -> None:
        if self.mode == "write":
            self.buf.zero_()
        else:  # a reduction over every byte: the whole buffer read, one scalar written
            torch.amax(self.buf.view(torch.float16), dim=0, out=self._max)


class Timing(NamedTuple):
    us: float  # median of single replays after an L2 flush
    us_hot: float  # median of back-to-back replays (weights may stay in L2)
    first_call_s: float  # the first eager call, synchronised (Triton: includes its compilation)
    timed: int  # replays timed in each series (repeats * replays, fewer for a slow contender)
    out: object  # the graph's static output, holding the last replay's result
    graph: object  # keeps `out` alive


def time_graph(fn: Callable[[], object], repeats: int, replays: int, flush: Callable[[], None]) -> Timing:
    """Warm up on a side stream, capture one call in a CUDA graph, time its replays (see the method).
    A contender whose replay takes longer than TIME_BUDGET_S / (repeats * replays) is timed on fewer
    replays (at least MIN_TIMED per series) so a slow one cannot dominate the run."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(WARMUPS - 1):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()  # the first replay uploads the graph; its time sizes the series
    end.record()
    end.synchronize()
    once_s = max(start.elapsed_time(end) / 1e3, 1e-9)
    n = max(MIN_TIMED, min(repeats * replays, int(TIME_BUDGET_S / once_s)))
    repeats = min(repeats, n)
    replays = max(1, n // repeats)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats * replays)]
    for start, end in events:
        flush()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    cold = [start.elapsed_time(end) * 1e3 for start, end in events]
    hot = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        hot.append(start.elapsed_time(end) * 1e3 / replays)
    return Timing(statistics.median(cold), statistics.median(hot), first, repeats * replays, out, graph)


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


# ---- shapes ------------------------------------------------------------------------------------


def resolve_shape(name: str, artifacts_dir: Path, target: str) -> tuple[MoESpec, Path | None]:
    """(spec, artifact dir or None). The spec comes from the artifact's manifest when it is built, else
    from a spec file (a .yaml path, scripts/specs/<name>.yaml or examples/specs/<name>.yaml)."""
    art = Path(artifacts_dir) / Path(name).stem / target
    if (art / "manifest.json").is_file():
        return spec_from_dict(read_manifest(art)["spec"]), art
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return load_spec(p), None
    for d in SPEC_DIRS:
        if (d / f"{name}.yaml").is_file():
            return load_spec(d / f"{name}.yaml"), None
    known = sorted({q.stem for d in SPEC_DIRS for q in d.glob("*.yaml")})
    raise SpecError("--shapes", name, f"an artifact under {artifacts_dir}/<name>/{target} or a spec: {' | '.join(known)}")


# ---- report ------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict:
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    props = torch.cuda.get_device_properties(device)
    return {"card": torch.cuda.get_device_name(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "compute_capability": list(torch.cuda.get_device_capability(device)),
            "memory_bytes": props.total_memory, "l2_bytes": getattr(props, "L2_cache_size", None),
            "sm_count": props.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version, "python": platform.python_version(), "moegen": __version__}


def _cell_text(cell: dict, name: str) -> str:
    if name in cell.get("errors", {}):
        return "error"
    if name not in cell["us"]:
        return "-"
    us = cell["us"][name]
    flag = "" if cell["ok"].get(name, True) else "!"
    return f"{us:.0f} ({cell['floor_us'] / us * 100:.0f}%){flag}"


def format_table(report: dict) -> str:
    """One line per cell: floor, then each contender's µs (its % of the floor); "!" marks an output
    above the tolerance against moe_ref, "error" a contender that failed (the JSON says why)."""
    names = report["contenders"]
    sweep = "triton" in names  # the best Triton config of each cell in the last column
    head = (["shape", "T", "experts", "floor µs", "bound"] + [f"{n} µs (% floor)" for n in names]
            + (["triton config"] if sweep else []))
    lines = []
    for c in report["cells"]:
        lines.append([c["shape"], str(c["tokens"]), f"{c['experts_touched']}", f"{c['floor_us']:.0f}",
                      "bw" if c["bound"] == "bandwidth" else "flops"]
                     + [_cell_text(c, n) for n in names]
                     + ([c.get("triton", {}).get("best") or "-"] if sweep else []))
    table = [head, None] + lines
    widths = [max(len(cells[i]) for cells in table if cells) for i in range(len(head))]

    def fmt(cells):  # text columns left, numbers right
        return "  ".join(c.ljust(w) if i in (0, 4) or (sweep and i == len(head) - 1) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    out = [fmt(cells) if cells else fmt(["-" * w for w in widths]) for cells in table]
    if any(not ok for c in report["cells"] for ok in c["ok"].values()):
        out.append(f"! = output differs from moe_ref by more than the tolerance ({report['tolerance']:.1e} "
                   "relative L2): see rel_err in the JSON")
    return "\n".join(out)


def ceilings_line(c: dict) -> str:
    """The ceilings of a report, each with the statistic the floor takes and the other one (reports before
    session 10: the best of CEILING_TRIES calls for both, no other statistic)."""
    stat = c.get("statistic", {"copy": "best", "gemm": "best"})
    other = {"best": "median", "median": "best"}

    def also(key, kind, fmt):
        k = f"{key}_{other[stat[kind]]}"
        return f"; {other[stat[kind]]} {format(c[k] / 1e12, fmt)}" if k in c else ""

    span = f" over {c['seconds']:g} s" if "seconds" in c else ""
    return (f"ceilings: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + written, {c['copy_tensor_bytes'] >> 20} "
            f"MiB; {stat['copy']} call{span}{also('copy_bytes_per_s', 'copy', '.2f')}), bf16 GEMM "
            f"{c['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s ({c['gemm_size']}³; {stat['gemm']} call{span}"
            f"{also('gemm_flops_per_s', 'gemm', '.0f')})")


def shapes_lines(report: dict) -> list[str]:
    out = []
    for name, s in report["shapes"].items():
        load = s.get("load_first_forward_ms")
        checks = ", ".join(f"{n} {v['rel_err']:.1e}" if "rel_err" in v else f"{n} {v.get('error', '-')}"
                           for n, v in s.get("check", {}).items())
        out.append(f"{name}: load + first forward {'-' if load is None else f'{load:.1f} ms'}; "
                   f"check at {report['check_tokens']} tokens (rel err vs moe_ref): {checks}")
    return out


# ---- plot --------------------------------------------------------------------------------------


def plot_report(report: dict, path) -> Path:
    """A PNG: left, the roofline (arithmetic intensity vs achieved TFLOP/s of every contender and cell,
    under the measured copy-bandwidth and GEMM roofs); right, each contender's % of the floor per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, cells, ceil = report["contenders"], report["cells"], report["ceilings"]
    bw, peak = ceil["copy_bytes_per_s"], ceil["gemm_flops_per_s"]
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    shapes = list(dict.fromkeys(c["shape"] for c in cells))
    markers = dict(zip(shapes, "osD^vP*X"))
    fig, (roof, pct) = plt.subplots(1, 2, figsize=(16, 6.5), gridspec_kw={"width_ratios": [1, 1.3]})

    ai = [c["intensity"] for c in cells] or [1.0]
    lo, hi = min(ai) / 2, max(max(ai) * 2, 2 * peak / bw)
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    roof.plot(xs, [min(peak, bw * x) / 1e12 for x in xs], color="black", lw=1.5)
    roof.annotate(f"copy {bw / 1e12:.2f} TB/s", (lo, bw * lo / 1e12), xytext=(4, 8), textcoords="offset points", fontsize=8)
    roof.annotate(f"bf16 GEMM {peak / 1e12:.0f} TFLOP/s", (hi, peak / 1e12), xytext=(-4, 6), textcoords="offset points",
                  fontsize=8, ha="right")
    for c in cells:
        for n in names:
            if n in c["us"]:
                roof.scatter(c["intensity"], c["flops"] / (c["us"][n] / US_PER_S) / 1e12, color=colors[n],
                             marker=markers[c["shape"]], s=36, alpha=0.85,
                             edgecolors="red" if not c["ok"].get(n, True) else "none")
    roof.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP per byte touched)",
             ylabel="achieved TFLOP/s", title="roofline: each point is one contender on one cell")
    roof.grid(True, which="both", alpha=0.3)

    x = 0
    ticks, labels, spans = [], [], []
    for s in shapes:
        mine = [c for c in cells if c["shape"] == s]
        first = x
        for c in mine:
            for n in names:
                if n in c["us"]:
                    pct.scatter(x, c["floor_us"] / c["us"][n] * 100, color=colors[n], marker=markers[s], s=36,
                                edgecolors="red" if not c["ok"].get(n, True) else "none")
            ticks.append(x)
            T = c["tokens"]
            labels.append(f"{T // 1024}k" if T >= 1024 and T % 1024 == 0 else str(T))  # 4096 -> 4k: ticks stay apart
            x += 1
        spans.append((s, first, x - 1))
        x += 1  # a gap between shapes
    for s, a, b in spans:
        pct.annotate(s, ((a + b) / 2, 0), xycoords=("data", "axes fraction"), xytext=(0, -30),
                     textcoords="offset points", ha="center", fontsize=9)
    pct.axhline(100, color="black", lw=1)
    pct.set_xticks(ticks, labels, fontsize=8)
    pct.set(ylabel="% of floor (floor / time; 100% = at the floor)", ylim=(0, None),
            title="% of the floor per cell (x: tokens, grouped by shape)")
    pct.grid(True, axis="y", which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[n], marker="o", ls="", label=n) for n in names]
    handles += [plt.Line2D([], [], color="gray", marker=markers[s], ls="", label=s) for s in shapes]
    pct.legend(handles=handles, fontsize=8, loc="lower left")
    m = report["machine"]
    fig.suptitle(f"moegen bench {report['target']} — {m.get('card', '?')}, {m.get('date', '?')[:10]}, "
                 f"torch {m.get('torch')}, triton {m.get('triton')}; time = CUDA-graph replay after an L2 flush "
                 "(red edge: output over tolerance)", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the run -----------------------------------------------------------------------------------


def _outputs_ok(err: float, tol: float) -> bool:
    return math.isfinite(err) and err <= tol


def run_bench_cuda(target: str, shapes: list[str], tokens: list[int], artifacts_dir, *, json_path=None,
                   plot_path=None, repeats: int = DEFAULT_REPEATS, replays: int = DEFAULT_REPLAYS,
                   triton_configs: int = 0, contenders: list[str] | None = None, l2_flush: str = "read",
                   echo: Callable[[str], None] = print) -> dict:
    """Benchmark every shape at every token count on the GPU (see the module's method). Returns the
    report (what --json writes, after every shape so a long run leaves its part)."""
    if not torch.cuda.is_available():
        raise BenchUnavailable(f"--target {target} needs a CUDA GPU, and torch {torch.__version__} sees none "
                               "(run it on the GPU box: make bench-gpu)")
    names = list(contenders or CONTENDERS)
    bad = [n for n in names if n not in CONTENDERS]
    if bad or not names:
        raise SpecError("--contenders", ",".join(names), ",".join(CONTENDERS) + " (any subset)")
    if repeats < 1 or replays < 1:
        raise SpecError("--repeats/--replays", (repeats, replays), "integers >= 1")
    resolved = [resolve_shape(s, Path(artifacts_dir), target) for s in shapes]  # all checked before the long part
    device = torch.device("cuda", torch.cuda.current_device())
    flush = L2Flush(device, l2_flush)  # (its mode checked here too)
    if "triton" in names:
        try:
            import triton  # noqa: F401
        except ImportError:
            echo("triton is not importable here: the Triton contender is skipped")
            names.remove("triton")
    if plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            echo(f"matplotlib is not importable here: no plot; make it elsewhere from the JSON "
                 f"(moegen bench-plot {json_path or 'BENCH.json'} -o {plot_path})")
            plot_path = None
    from .runtime import MoERunner

    echo(f"{torch.cuda.get_device_name(device)}: measuring ceilings")
    ceilings = measure_ceilings(device)
    echo(ceilings_line(ceilings))
    echo(f"timing: CUDA graphs, median of {repeats}x{replays} replays (fewer, at least {MIN_TIMED}, past "
         f"{TIME_BUDGET_S:.0f} s), each after an L2 flush ({flush.nbytes >> 20} MiB "
         f"{'read' if l2_flush == 'read' else 'written'}); also back-to-back (hot)")
    report = {"schema": SCHEMA, "target": target, "machine": machine_info(device), "ceilings": ceilings,
              "method": {"warmups": WARMUPS, "repeats": repeats, "replays": replays,
                         "l2_flush_bytes": flush.nbytes, "l2_flush": l2_flush, "triton_configs": triton_configs or None,
                         "time_budget_s": TIME_BUDGET_S, "min_timed": MIN_TIMED},
              "check_tokens": CHECK_TOKENS, "contenders": names, "tolerance": None, "shapes": {}, "cells": []}

    def dump():
        if json_path is not None:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(report, indent=1) + "\n")

    from .baselines.triton_moe import candidate_configs

    for spec, art in resolved:
        tol = TOLERANCES[spec.dtype]
        report["tolerance"] = max(report["tolerance"] or 0.0, tol)
        echo(f"{spec.name}: E={spec.num_experts} K={spec.top_k} H={spec.hidden_size} I={spec.intermediate_size} "
             f"{spec.dtype} {spec.activation}" + ("" if art else " (no artifact: moegen skipped)"))
        t0 = time.perf_counter()
        weights = device_weights(spec, device)
        torch.cuda.synchronize()
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        shape_rec = {"E": spec.num_experts, "K": spec.top_k, "H": spec.hidden_size, "I": spec.intermediate_size,
                     "dtype": spec.dtype, "activation": spec.activation, "spec_hash": spec.hash,
                     "artifact": str(art) if art else None, "weights_bytes": nbytes,
                     "weights_seconds": round(time.perf_counter() - t0, 2), "check": {}}
        report["shapes"][spec.name] = shape_rec
        runner = None
        if art is not None and "moegen" in names:
            x1, lg1 = cell_inputs(spec, 1, device, INPUTS_SEED)
            try:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                runner = MoERunner.load(art, weights, device=device)
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                runner(x1, lg1)
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                shape_rec.update(load_ms=(t1 - t0) * 1e3, load_first_forward_ms=(t2 - t0) * 1e3)
                echo(f"  moegen: load {(t1 - t0) * 1e3:.1f} ms, load + first forward {(t2 - t0) * 1e3:.1f} ms")
            except (ArtifactError, RuntimeError, ValueError) as e:
                shape_rec["moegen_error"] = _short(e)
                echo(f"  moegen: cannot load {art}: {_short(e)}")
        # correctness before timing: every contender, eagerly, at CHECK_TOKENS tokens
        xc, lgc = cell_inputs(spec, CHECK_TOKENS, device, INPUTS_SEED)
        refc = reference(spec, weights, xc, lgc)
        for n in names:
            try:
                cfg = candidate_configs(CHECK_TOKENS, spec.top_k, spec.num_experts)[0] if n == "triton" else None
                err = rel_err(make_contender(n, spec, weights, runner, lgc, cfg)(xc, lgc), refc)
                shape_rec["check"][n] = {"rel_err": err, "ok": _outputs_ok(err, tol)}
            except Exception as e:  # a contender that cannot run is reported, the others go on
                shape_rec["check"][n] = {"error": _short(e), "ok": False}
        echo("  check at %d tokens (rel err vs moe_ref): %s" % (CHECK_TOKENS, ", ".join(
            f"{n} {v['rel_err']:.1e}{'' if v['ok'] else ' WRONG'}" if "rel_err" in v else f"{n} ERROR {v['error']}"
            for n, v in shape_rec["check"].items())))
        del xc, lgc, refc

        for T in tokens:
            if T == 0:
                echo("  T=0: skipped (nothing to time)")
                continue
            x, logits = cell_inputs(spec, T, device, INPUTS_SEED + T)
            from .baselines.torch_moe import route

            ids, _ = route(spec, weights, logits)
            cell = {"shape": spec.name, "tokens": T, **cell_floor(spec, ids, ceilings),
                    "us": {}, "us_hot": {}, "rel_err": {}, "ok": {}, "errors": {}, "first_call_s": {},
                    "timed_replays": {}}
            ref = reference(spec, weights, x, logits)

            def measure(n: str, fn, reps: int) -> Timing | None:
                try:
                    t = time_graph(lambda: fn(x, logits), reps, replays, flush)
                except Exception as e:
                    cell["errors"][n] = _short(e)
                    return None
                return t

            for n in names:
                if n == "moegen" and runner is None:
                    continue
                if n == "triton":
                    sweep, best = {}, None
                    for cfg in candidate_configs(T, spec.top_k, spec.num_experts, triton_configs or None):
                        t = measure(f"triton {cfg.name}", make_contender(n, spec, weights, runner, logits, cfg), 1)
                        if t is None:
                            sweep[cfg.name] = {"error": cell["errors"].pop(f"triton {cfg.name}")}
                            continue
                        err = rel_err(t.out, ref)
                        sweep[cfg.name] = {"us": t.us, "rel_err": err, "first_call_s": round(t.first_call_s, 3)}
                        if _outputs_ok(err, tol) and (best is None or t.us < sweep[best.name]["us"]):
                            best = cfg
                        del t
                    cell["triton"] = {"best": best.name if best else None, "sweep": sweep}
                    if best is None:
                        cell["errors"][n] = "no config ran correctly (see triton.sweep)"
                        continue
                    fn = make_contender(n, spec, weights, runner, logits, best)
                else:
                    try:
                        fn = make_contender(n, spec, weights, runner, logits)
                    except Exception as e:
                        cell["errors"][n] = _short(e)
                        continue
                t = measure(n, fn, repeats)
                if t is None:
                    continue
                err = rel_err(t.out, ref)
                cell["us"][n], cell["us_hot"][n], cell["first_call_s"][n] = t.us, t.us_hot, round(t.first_call_s, 3)
                cell["rel_err"][n], cell["ok"][n] = err, _outputs_ok(err, tol)
                cell["timed_replays"][n] = t.timed
                del t, fn
            cell["pct_of_floor"] = {n: cell["floor_us"] / us * 100 for n, us in cell["us"].items()}
            report["cells"].append(cell)
            echo(f"  T={T}: floor {cell['floor_us']:.0f} µs ({cell['bound']}), "
                 + ", ".join(f"{n} {_cell_text(cell, n)}" for n in names)
                 + (f", triton best {cell['triton']['best']}" if "triton" in cell else ""))
            for n, e in cell["errors"].items():
                echo(f"    {n}: {e}")
            del x, logits, ids, ref
        dump()
        del runner, weights
        gc.collect()
        torch.cuda.empty_cache()
    dump()
    echo("")
    echo(ceilings_line(ceilings))
    for line in shapes_lines(report):
        echo(line)
    if report["cells"]:
        echo(format_table(report))
    if plot_path is not None:
        echo(f"wrote {plot_report(report, plot_path)}")
    return report
