"""`moegen tune`: time candidate schedule configs on the device and write the winners as a schedules file.

Two halves that run on different machines:

- build side (`moegen tune build`, the CPU box with TVM and nvcc): a candidates file (schedules/candidates/
  <family>.yaml) expands to ExpertsConfig candidates; those config_ok rejects for the spec's shapes
  (after fit_config) are dropped; each remaining one builds as a one-path artifact under
  TUNE_DIR/<id>/, and TUNE_DIR/candidates.json describes them.
- run side (`moegen tune run`, the GPU box: torch, tvm-ffi, click, yaml; never apache-tvm): every
  candidate is loaded with the same random weights, checked against the reference (a wrong one is
  rejected, never chosen), timed at each token count (CUDA graph replays on a GPU), close calls are
  timed again together (close_calls), and the fastest per token count become the paths of a
  schedules file; TUNE_DIR/results.json keeps every time.

Nothing at module level imports apache-tvm: the build side imports it inside its functions.
Shape legend: T tokens, K top-k, El local experts; rows per expert = T*K/El (what the runner's
pick_path compares with max_rows_per_expert).
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

SCHEDULES_DIR = Path(__file__).resolve().parents[1] / "schedules"
CANDIDATES_DIR = SCHEDULES_DIR / "candidates"
CANDIDATES_JSON = "candidates.json"
RESULTS_JSON = "results.json"
PATH_NAME = "tuned"  # the one path of a candidate artifact
# The first pass times the candidates one after another, so a drift of the device's clock over the run (an
# H100 under its power cap) falls on some and not others: the candidates within CLOSE_CALL of the fastest
# (at most CONFIRM_GROUP of them, each loaded with its own packed weights) are timed again together in
# rounds of rotating order (docs/perf.md, session 12: in a fixed order of seven variants, the one after a
# slow variant read 1% fast; alone against the shipped tile it was 0.8% slower).
CLOSE_CALL = 0.03
CONFIRM_GROUP = 3
CONFIRM_ROUNDS = 5  # default of `moegen tune run --confirm-rounds` (0: no head-to-head)
FORMAT = 1  # of candidates.json


class TuneError(ValueError):
    """Bad input to the tuner (candidates file, tune directory, options): one line, exit 2."""


class AllRejected(RuntimeError):
    """Every candidate failed its correctness check (or to load): nothing to choose from, exit 1."""


# ---- shared helpers (no TVM) -----------------------------------------------------------------------


def candidate_id(config: dict) -> str:
    """Short hash of a (fitted) config: names the candidate's directory and its row in every table."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


def _write_atomic(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- build side: candidates -> one-path artifacts (CPU box, TVM + nvcc) ------------------------------


def expand_candidates(data: Any, source: str) -> list:
    """The ExpertsConfig candidates a candidates file lists, in order, duplicates dropped.

    Format: `base:` fields every candidate starts from (over ExpertsConfig's defaults); `grid:` a mapping
    field -> list of values, or a list of such mappings, each a cross product; `configs:` explicit
    candidates. Fields are checked like a schedules file's (moegen.schedule.config)."""
    from .schedule.config import ScheduleError, experts_config_from_dict

    where = f"candidates file {source}"
    if not isinstance(data, dict):
        raise TuneError(f"{where}: expected a mapping with `grid:` and/or `configs:` (and optional `base:`)")
    unknown = sorted(set(data) - {"base", "grid", "configs"})
    if unknown:
        raise TuneError(f"{where}: unknown section {unknown[0]!r}; allowed: base | grid | configs")
    if not set(data) & {"grid", "configs"}:
        raise TuneError(f"{where}: expected a mapping with `grid:` and/or `configs:` (and optional `base:`)")
    try:
        base = experts_config_from_dict(data.get("base") or {}, f"{where}: base", partial=True)
        grids = data.get("grid") or []
        grids = [grids] if isinstance(grids, dict) else grids
        if not isinstance(grids, list):
            raise TuneError(f"{where}: grid: expected a mapping of field -> list of values, or a list of them")
        dicts = []
        for i, g in enumerate(grids):
            if not isinstance(g, dict) or not g:
                raise TuneError(f"{where}: grid[{i}]: expected a mapping of field -> list of values")
            axes = {}
            for k, v in g.items():
                vals = v if isinstance(v, list) else [v]
                if not vals:
                    raise TuneError(f"{where}: grid[{i}].{k}: empty list")
                for x in vals:
                    experts_config_from_dict({k: x}, f"{where}: grid[{i}]", partial=True)
                axes[k] = vals
            for combo in itertools.product(*axes.values()):
                dicts.append(dict(base, **dict(zip(axes, combo))))
        configs = data.get("configs") or []
        if not isinstance(configs, list):
            raise TuneError(f"{where}: configs: expected a list of mappings")
        for i, c in enumerate(configs):
            experts_config_from_dict(c, f"{where}: configs[{i}]", partial=True)
            dicts.append(dict(base, **c))
        out, seen = [], set()
        for i, d in enumerate(dicts):
            cfg = experts_config_from_dict(d, f"{where}: candidate {i} {d}")
            if cfg not in seen:
                seen.add(cfg)
                out.append(cfg)
    except ScheduleError as e:
        raise TuneError(str(e)) from None
    return out


def filter_candidates(configs: list, shapes, target=None) -> tuple[list[dict], list[dict]]:
    """Fit every candidate to the layer's widths, drop what config_ok rejects, what the target cannot
    build (wgmma outside Hopper) and what fits to a config already kept. Returns (kept [{id, config,
    fitted}], rejected [{config, why}])."""
    import dataclasses

    from .schedule.config import config_ok, fit_config, target_ok

    kept, rejected, ids = [], [], {}
    for cfg in configs:
        asked = dataclasses.asdict(cfg)
        try:  # widths fit_config shrinks to divisors; what it cannot fix, config_ok names
            fitted = fit_config(cfg, shapes)
            why = config_ok(fitted, shapes)
        except AssertionError as e:
            why = str(e)
        if why is None and target is not None:
            why = target_ok(fitted, target)
        if why is not None:
            rejected.append({"config": asked, "why": why})
            continue
        fd = dataclasses.asdict(fitted)
        cid = candidate_id(fd)
        if cid in ids:
            rejected.append({"config": asked, "why": f"fits to the same config as candidate {cid}"})
            continue
        ids[cid] = True
        kept.append({"id": cid, "config": asked, "fitted": fd})
    return kept, rejected


def load_candidates_file(path: Path | str) -> list:
    from .schedule.config import read_yaml

    return expand_candidates(read_yaml(path, "candidates file", TuneError), str(path))


def _reusable(art: Path, spec, fitted: dict, sched_sha: str) -> bool:
    """An artifact a previous `tune build` left that was built from this spec, config and schedule."""
    import tvm

    from .artifact import ArtifactError, read_manifest

    try:
        m = read_manifest(art)
    except ArtifactError:
        return False
    from .build import generator_hash

    return (m["spec_hash"] == spec.hash and m.get("tvm_version") == tvm.__version__
            and m.get("generator_sha256") == generator_hash()
            and [p["config"] for p in m["paths"]] == [fitted] and (m.get("schedules") or {}).get("sha256") == sched_sha)


def build_candidates(spec, target_name: str, candidates_path: Path | str, tune_dir: Path | str, *,
                     echo: Callable[[str], None] = print) -> dict:
    """Build every candidate that fits `spec` as a one-path artifact under tune_dir/<id>/ (no golden data)
    and write tune_dir/candidates.json. Artifacts already built from the same spec and config are reused."""
    import yaml

    from .artifact import sha256_file
    from .build import build, expert_shapes, schedule_source
    from .targets import load_target

    target = load_target(target_name)
    configs = load_candidates_file(candidates_path)
    kept, rejected = filter_candidates(configs, expert_shapes(spec), target)
    for r in rejected:
        echo(f"  skipped {r['config']}: {r['why']}")
    if not kept:
        raise TuneError(f"candidates file {candidates_path}: no candidate fits {spec.name} "
                        f"(all {len(configs)} rejected by config_ok)")
    base_path, base, base_record = schedule_source(target)
    routing = dict(base.get("routing") or {})
    pack = dict(base.get("pack") or {})  # kept like routing: candidates differ in their expert kernels only
    tune_dir = Path(tune_dir)
    tune_dir.mkdir(parents=True, exist_ok=True)
    echo(f"{len(kept)} candidates for {spec.name} on {target.name} ({len(rejected)} skipped); "
         f"routing from {base_record['file']}")
    t0 = time.perf_counter()
    for i, c in enumerate(kept):
        d = tune_dir / c["id"]
        sched = d / "schedule.yaml"
        text = yaml.safe_dump({"paths": [{"name": PATH_NAME, "max_rows_per_expert": None, "experts": c["fitted"]}],
                               **({"routing": routing} if routing else {}), **({"pack": pack} if pack else {})},
                              sort_keys=False)
        if not sched.is_file() or sched.read_text() != text:
            _write_atomic(sched, text)
        art = d / spec.name / target.name
        c["artifact"] = art.relative_to(tune_dir).as_posix()
        if _reusable(art, spec, c["fitted"], sha256_file(sched)):
            echo(f"  [{i + 1}/{len(kept)}] {c['id']} reused  {c['fitted']}")
            continue
        build(spec, target.name, d, golden=False, schedules=sched)
        echo(f"  [{i + 1}/{len(kept)}] {c['id']} built  {c['fitted']}  ({time.perf_counter() - t0:.1f} s)")
    doc = {"format": FORMAT, "spec": spec.to_dict(), "spec_name": spec.name, "spec_hash": spec.hash,
           "target": target.name, "family": target.family, "candidates_file": str(candidates_path),
           "base_schedule": base_record, "routing": routing, "pack": pack,
           "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "candidates": kept, "rejected": rejected}
    _write_atomic(tune_dir / CANDIDATES_JSON, json.dumps(doc, indent=1))
    return doc


# ---- choosing winners (pure Python) ---------------------------------------------------------------


def pick_winners(times: dict[str, list[float]], order: list[str], layout: dict[str, Any] | None = None) -> list[str]:
    """Per token count (index), the candidate with the lowest time; ties go to the earlier one in
    `order`. `times[id][i]` is the time at the i-th token count (missing candidates are ignored).

    layout: candidate -> the packed weight layout it reads (block_n_up, block_n_down). The runner packs
    the weights once per layout, so paths of two layouts would hold the weights twice: winners all come
    from the one layout whose best times are closest to the unrestricted best (geometric mean of the
    ratios over token counts; ties to the layout of the earlier candidate)."""
    ids = [c for c in order if c in times]
    if not ids:
        raise ValueError("no candidate has times")
    n = len(times[ids[0]])
    if layout is not None:
        best = [min(times[c][i] for c in ids) for i in range(n)]
        groups: dict[Any, list[str]] = {}
        for c in ids:
            groups.setdefault(layout[c], []).append(c)

        def cost(members: list[str]) -> float:
            return math.fsum(math.log(min(times[c][i] for c in members) / best[i]) for i in range(n))

        chosen = min(groups.values(), key=lambda m: (cost(m), ids.index(m[0])))
        ids = [c for c in ids if c in chosen]
    return [min(ids, key=lambda c: (times[c][i], ids.index(c))) for i in range(n)]


def close_calls(times: dict[str, list[float]], order: list[str], close: float = CLOSE_CALL,
                most: int = CONFIRM_GROUP) -> dict[tuple[str, ...], list[int]]:
    """{(fastest, the others within `close` of it, fastest first, at most `most` in all): the token-count
    indices where that is the group}, from first-pass times (candidate id -> one time per token count; ties go
    to the earlier in `order`). A token count whose runner-up is not within the margin has no group."""
    ids = [c for c in order if c in times]
    groups: dict[tuple[str, ...], list[int]] = {}
    for j in range(len(times[ids[0]]) if ids else 0):
        ranked = sorted(ids, key=lambda c: (times[c][j], ids.index(c)))
        group = tuple(c for c in ranked[:most] if times[c][j] <= times[ranked[0]][j] * (1 + close))
        if len(group) > 1:
            groups.setdefault(group, []).append(j)
    return groups


def _bound(lo: float, hi: float) -> float:
    """The geometric midpoint of two measured rows-per-expert points, with the fewest significant digits
    (3 or more) that keep it strictly between them."""
    mid = math.sqrt(lo * hi)
    for digits in range(3, 18):
        short = float(f"{mid:.{digits}g}")
        if lo < short < hi:
            return short
    return mid


def merge_paths(tokens: list[int], winners: list[str], top_k: int, local_experts: int) -> list[dict]:
    """Paths from per-token-count winners: adjacent token counts with the same winner share a path;
    a path serves rows per expert (T*K/El) up to the geometric midpoint between its last measured point
    and the next path's first one; the last path is unbounded (max_rows_per_expert None).
    Returns [{name, max_rows_per_expert, candidate, tokens}] in order."""
    if len(tokens) != len(winners) or not tokens:
        raise ValueError("one winner per token count")
    if any(b <= a for a, b in zip(tokens, tokens[1:])) or tokens[0] < 1:
        raise ValueError(f"token counts must be >= 1 and increasing: {tokens}")
    groups: list[tuple[str, list[int]]] = []
    for t, w in zip(tokens, winners):
        if groups and groups[-1][0] == w:
            groups[-1][1].append(t)
        else:
            groups.append((w, [t]))
    rows = lambda t: t * top_k / local_experts  # noqa: E731
    out = []
    for j, (w, ts) in enumerate(groups):
        bound = _bound(rows(ts[-1]), rows(groups[j + 1][1][0])) if j + 1 < len(groups) else None
        name = f"t{ts[0]}" if len(ts) == 1 else f"t{ts[0]}_{ts[-1]}"
        out.append({"name": name, "max_rows_per_expert": bound, "candidate": w, "tokens": ts})
    return out


def schedule_yaml(paths: list[dict], configs: dict[str, dict], routing: dict, header: list[str],
                  notes: dict[str, str] | None = None, pack: dict | None = None) -> str:
    """A schedules file (the format of schedules/*.yaml) for merged paths: `configs[id]` is the experts
    config of each candidate, `notes[name]` an optional comment per path; `routing` and `pack` (the
    weight-packing kernels) as the base schedule had them."""
    import yaml

    def flow(d):
        return yaml.safe_dump(d, default_flow_style=True, sort_keys=False, width=10_000).strip()

    lines = [f"# {h}" if h else "#" for h in header]
    lines.append("paths:")
    for p in paths:
        note = (notes or {}).get(p["name"])
        lines.append(f"  - name: {p['name']}" + (f"    # {note}" if note else ""))
        b = p["max_rows_per_expert"]
        lines.append(f"    max_rows_per_expert: {'null' if b is None else repr(float(b))}")
        lines.append(f"    experts: {flow(configs[p['candidate']])}")
    if routing:
        lines.append(f"routing: {flow(routing)}")
    if pack:
        lines.append(f"pack: {flow(pack)}")
    text = "\n".join(lines) + "\n"
    check = yaml.safe_load(text)  # the file says what was meant (the full check is read_schedule)
    assert [q["experts"] for q in check["paths"]] == [configs[p["candidate"]] for p in paths], text
    assert [q["max_rows_per_expert"] for q in check["paths"]] == [p["max_rows_per_expert"] for p in paths], text
    return text


# ---- run side: time the candidates (GPU box: torch + tvm-ffi only) -------------------------------------


def read_candidates(tune_dir: Path | str) -> dict:
    path = Path(tune_dir) / CANDIDATES_JSON
    if not path.is_file():
        raise TuneError(f"{tune_dir}: no {CANDIDATES_JSON} (make one with `moegen tune build`)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TuneError(f"{path}: corrupt ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not doc.get("candidates"):
        raise TuneError(f"{path}: not a candidates.json of format {FORMAT} with candidates; rerun `moegen tune build`")
    return doc


def _device(device: str, family: str):
    import torch

    if device == "auto":
        device = "cuda" if family == "cuda" else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TuneError(f"option '--device': got {device!r}; allowed: auto | cpu | cuda | cuda:N") from None
    if (dev.type == "cuda") != (family == "cuda"):
        raise TuneError(f"option '--device': {device} cannot run {family} candidates; "
                        f"allowed: {'cuda | cuda:N' if family == 'cuda' else 'cpu'}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TuneError("option '--device': cuda, but torch sees no CUDA GPU")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def device_name(dev) -> str:
    import platform

    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def time_forward(runner, x, logits, *, repeats: int = 5, target_s: float = 0.02) -> float:
    """Median seconds of one forward. CUDA: captured in a CUDA graph (after eager warm-up on a side
    stream, which also allocates the runner's staging buffers), replayed n times per repeat between two
    events; CPU: wall clock. n grows until a repeat takes about target_s."""
    import torch

    if x.device.type != "cuda":
        runner(x, logits)
        t0 = time.perf_counter()
        runner(x, logits)
        n = max(1, min(200, round(target_s / max(time.perf_counter() - t0, 1e-7))))
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                runner(x, logits)
            out.append((time.perf_counter() - t0) / n)
        return statistics.median(out)
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        for _ in range(3):
            runner(x, logits)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        runner(x, logits)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(2):
        graph.replay()
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    n = max(1, min(500, round(target_s / max(start.elapsed_time(end) / 1e3, 1e-7))))
    out = []
    for _ in range(repeats):
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / n)
    del graph
    return statistics.median(out)


def _time_together(runners: dict, inputs, rounds: int, repeats: int) -> dict[str, list[float]]:
    """{name: its time in µs in each of `rounds` rounds} of runners timed on the same inputs, each round
    starting one runner later than the last, so that none keeps one place in the order."""
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        for n in names[i % len(names):] + names[:i % len(names)]:
            times[n].append(time_forward(runners[n], *inputs, repeats=repeats) * 1e6)
    return times


def _check_cases(spec, weights, tokens: list[int], seed: int):
    """Inputs and reference outputs (CPU, fp32) for the correctness check of every candidate."""
    import torch

    from .reference import moe_ref

    gen = torch.Generator().manual_seed(seed)
    dt = getattr(torch, spec.dtype)
    cases = []
    for T in tokens:
        x = torch.randn(T, spec.hidden_size, generator=gen).to(dt)
        logits = torch.randn(T, spec.num_experts, generator=gen) * 2
        ref = moe_ref(spec, weights, x, logits)
        cases.append((T, x, logits, ref if isinstance(ref, tuple) else (ref,)))
    return cases


def check_candidate(runner, cases, tol: float, dev) -> tuple[bool, float]:
    """(ok, worst relative error) of a candidate against the reference cases; NaN or inf fails."""
    from .verify import rel_error

    worst = 0.0
    for T, x, logits, refs in cases:
        outs = runner(x.to(dev), logits.to(dev))
        outs = outs if isinstance(outs, tuple) else (outs,)
        for o, r in zip(outs, refs):
            if tuple(o.shape) != tuple(r.shape):
                return False, math.inf
            err = rel_error(o.cpu(), r)
            if not math.isfinite(err):
                return False, math.inf
            worst = max(worst, err)
    return worst <= tol, worst


def run_tuning(tune_dir: Path | str, tokens: list[int], out_path: Path | str, *, device: str = "auto",
               weights_seed: int = 0, check_tokens: tuple[int, ...] = (1, 33, 257), repeats: int = 5,
               confirm_rounds: int = CONFIRM_ROUNDS, echo: Callable[[str], None] = print) -> dict:
    """Check and time every candidate of tune_dir; time the close calls again together, in confirm_rounds
    rotated rounds (close_calls), which decide the order of each group; write the winners to out_path (a
    schedules file) and every measurement to tune_dir/results.json. Returns the results dict; raises
    TuneError on bad input and AllRejected when every candidate is rejected (results.json is written
    either way)."""
    import torch

    from .artifact import TOLERANCES
    from .reference import random_weights
    from .runtime import MoERunner
    from .spec import spec_from_dict

    tune_dir = Path(tune_dir)
    doc = read_candidates(tune_dir)
    tokens = sorted(set(tokens))
    if not tokens or tokens[0] < 1:
        raise TuneError(f"option '--tokens': got {tokens}; allowed: token counts >= 1")
    spec = spec_from_dict(doc["spec"])
    dev = _device(device, doc["family"])
    tol = TOLERANCES[spec.dtype]
    dt = getattr(torch, spec.dtype)
    K, El = spec.top_k, spec.local_experts
    echo(f"tuning {spec.name} ({len(doc['candidates'])} candidates, {doc['target']}) on {device_name(dev)}; "
         f"tokens {tokens} = rows per expert {[round(t * K / El, 3) for t in tokens]}")
    t0 = time.perf_counter()
    weights = random_weights(spec, weights_seed)
    wdev = {k: v.to(dev) for k, v in weights.items()}
    cases = _check_cases(spec, weights, sorted(set(check_tokens)), weights_seed + 1)
    echo(f"  weights (seed {weights_seed}) and reference at {sorted(set(check_tokens))} tokens: "
         f"{time.perf_counter() - t0:.1f} s")
    gen = torch.Generator().manual_seed(weights_seed + 2)
    inputs = {T: (torch.randn(T, spec.hidden_size, generator=gen).to(dt).to(dev),
                  (torch.randn(T, spec.num_experts, generator=gen) * 2).to(dev)) for T in tokens}
    results: dict[str, dict] = {}
    for i, c in enumerate(doc["candidates"]):
        cid, r = c["id"], {"config": c["fitted"], "artifact": c["artifact"]}
        results[cid] = r
        runner = None
        try:
            runner = MoERunner.load(tune_dir / c["artifact"], wdev, device=dev)
            ok, err = check_candidate(runner, cases, tol, dev)
            r["error"] = err
            if not ok:
                r["status"] = "rejected"
                r["why"] = f"relative error {err:.2e} over the {spec.dtype} tolerance {tol:.1e}"
            else:
                r["times_us"] = [time_forward(runner, *inputs[T], repeats=repeats) * 1e6 for T in tokens]
                r["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - a candidate that fails to load or run is rejected, not fatal
            r["status"] = "rejected"
            r["why"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        finally:
            del runner
            if dev.type == "cuda":
                try:
                    torch.cuda.synchronize(dev)
                    torch.cuda.empty_cache()
                except RuntimeError as e:  # a sticky CUDA error (illegal address): no later candidate can run
                    r["status"], r["why"] = "rejected", f"CUDA context lost: {' '.join(str(e).split())[:300]}"
                    _write_atomic(tune_dir / RESULTS_JSON, json.dumps({"candidates": results}, indent=1))
                    raise RuntimeError(f"candidate {cid} broke the CUDA context ({r['why']}); the results so far "
                                       f"are in {tune_dir / RESULTS_JSON}: drop it from the candidates and rerun") from None
        shown = (" ".join(f"{t:.1f}" for t in r["times_us"]) + " us") if r["status"] == "ok" else f"REJECTED ({r['why']})"
        echo(f"  [{i + 1}/{len(doc['candidates'])}] {cid}: {shown}  ({time.perf_counter() - t0:.1f} s)")
    order = [c["id"] for c in doc["candidates"]]
    first = {cid: list(r["times_us"]) for cid, r in results.items() if r["status"] == "ok"}
    artifacts = {c["id"]: tune_dir / c["artifact"] for c in doc["candidates"]}
    for group, cols in (close_calls(first, order, CLOSE_CALL, CONFIRM_GROUP) if confirm_rounds else {}).items():
        runners: dict[str, Any] = {}
        try:
            for cid in group:
                try:
                    runners[cid] = MoERunner.load(artifacts[cid], wdev, device=dev)
                except torch.cuda.OutOfMemoryError:  # each holds its packed weights: time the ones that fit
                    echo(f"  head to head without {cid} and after: out of device memory")
                    break
            names = list(runners)
            for j in cols if len(names) > 1 else ():
                rounds = _time_together(runners, inputs[tokens[j]], confirm_rounds, repeats)
                # the rounds order the group; its times stay on the first pass's scale (the other candidates'
                # were taken then, with the device's clock where it was then): the fastest by the rounds keeps
                # the group's best first-pass time, each other that times its ratio to it in the rounds
                med = {cid: statistics.median(rounds[cid]) for cid in names}
                lead = min(names, key=lambda cid: (med[cid], order.index(cid)))
                base = min(first[cid][j] for cid in names)
                for cid in names:
                    results[cid].setdefault("first_pass_us", first[cid])
                    results[cid].setdefault("head_to_head_us", {})[str(tokens[j])] = rounds[cid]
                    results[cid]["times_us"][j] = base * med[cid] / med[lead]
                echo(f"  head to head at T={tokens[j]} ({confirm_rounds} rounds, medians): "
                     + ", ".join(f"{cid} {med[cid]:.1f} us ({first[cid][j]:.1f} -> {results[cid]['times_us'][j]:.1f})"
                                 for cid in names))
        finally:
            del runners
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    good = {cid: r["times_us"] for cid, r in results.items() if r["status"] == "ok"}
    summary = {"spec_name": spec.name, "spec_hash": spec.hash, "target": doc["target"], "device": device_name(dev),
               "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "tokens": tokens, "rows_per_expert": [t * K / El for t in tokens], "check_tokens": sorted(set(check_tokens)),
               "weights_seed": weights_seed, "repeats": repeats, "tolerance": tol,
               "close_call": CLOSE_CALL, "confirm_rounds": confirm_rounds,
               "timing": "CUDA graph replay, torch.cuda.Event, median of repeats" if dev.type == "cuda"
               else "wall clock, median of repeats", "candidates": results}
    if not good:
        _write_atomic(tune_dir / RESULTS_JSON, json.dumps(summary, indent=1))
        raise AllRejected(f"every candidate was rejected; see {tune_dir / RESULTS_JSON}")
    layouts = {c["id"]: (c["fitted"]["block_n_up"], c["fitted"]["block_n_down"]) for c in doc["candidates"]}
    winners = pick_winners(good, order, layouts)
    paths = merge_paths(tokens, winners, K, El)
    summary["winners"] = dict(zip(map(str, tokens), winners))
    summary["paths"] = paths
    _write_atomic(tune_dir / RESULTS_JSON, json.dumps(summary, indent=1))
    notes = {}
    for p in paths:
        parts = []
        for T in p["tokens"]:
            j = tokens.index(T)
            others = sorted(v[j] for cid, v in good.items() if cid != p["candidate"])
            parts.append(f"T={T} {good[p['candidate']][j]:.1f} us" + (f" (next {others[0]:.1f})" if others else ""))
        notes[p["name"]] = f"candidate {p['candidate']}: " + ", ".join(parts)
    header = [f"Tuned by `moegen tune run` on {summary['device']}, {summary['date']} (torch {torch.__version__}).",
              f"Measured with {spec.name} (E={spec.num_experts} K={K} El={El} H={spec.hidden_size} "
              f"I={spec.intermediate_size} {spec.dtype}) built for {doc['target']}; every time: {tune_dir.name}/{RESULTS_JSON}.",
              f"Token counts {tokens} (rows per expert T*K/El {[round(t * K / El, 3) for t in tokens]}); a path serves",
              "T*K/El <= max_rows_per_expert, bounds at the geometric midpoint between measured points.",
              f"routing and pack: kept from {doc['base_schedule']['file']}, the schedule the candidates were built with."]
    configs = {cid: results[cid]["config"] for cid in good}
    _write_atomic(Path(out_path), schedule_yaml(paths, configs, doc.get("routing") or {}, header, notes,
                                                pack=doc.get("pack") or {}))
    _table(results, tokens, winners, order, echo)
    echo(f"wrote {out_path} ({len(paths)} paths) and {tune_dir / RESULTS_JSON}")
    from .spec import shape_key  # (no TVM on the GPU box)

    key = shape_key(spec.local_experts, K, spec.kernel_hidden, spec.local_intermediate)
    echo(f"builds of this layer shape read it as schedules/{doc['target']}/{key}.yaml")
    return summary


def _table(results: dict, tokens: list[int], winners: list[str], order: list[str], echo) -> None:
    """Candidates x token counts in microseconds, the winner of each column marked with '*'."""
    configs = [results[c]["config"] for c in order]
    varying = [k for k in configs[0] if len({json.dumps(c.get(k)) for c in configs}) > 1]
    abbrev = {"block_m": "bm", "block_n_up": "bnu", "block_n_down": "bnd", "combine_n": "cn", "split_k": "sk",
              "gather_rows": "gr", "grid_blocks": "gb", "dispatch_threads": "dt", "dispatch_tile": "dtile",
              "group_m": "gm", "dynamic_smem": "dyn", "vector_loads": "vec", "y_model_dtype": "ybf"}
    desc = {c: " ".join(f"{abbrev.get(k, k)}={results[c]['config'][k]}" for k in varying) for c in order}
    w = max([len(d) for d in desc.values()] + [6])
    echo(f"{'candidate':<10}  {'config':<{w}}  " + "".join(f"{'T=' + str(t):>11}" for t in tokens))
    for c in order:
        r = results[c]
        if r["status"] != "ok":
            echo(f"{c:<10}  {desc[c]:<{w}}  rejected: {r['why']}")
            continue
        cells = "".join(f"{r['times_us'][j]:>10.1f}{'*' if winners[j] == c else ' '}" for j in range(len(tokens)))
        echo(f"{c:<10}  {desc[c]:<{w}}  {cells}")
    echo("times in microseconds; * = fastest at that token count")
