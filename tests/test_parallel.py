"""Tier 2, parallel: TP, EP, TP x EP and sequence parallel on the CPU, across processes (torch.distributed gloo).

Every distinct spec is built once in this process (kernels for I/tp and E/ep); weights and inputs are made
here too. Each test starts one group of worker processes (one per rank, a FileStore rendezvous in tmp_path):
each worker loads the SAME artifact with its tp_rank/ep_rank, runs the calls it is given and saves its outputs;
this process then compares them with the single-rank oracle `moe_ref` of the whole layer (relative L2 within
TOLERANCES[dtype]). A worker that fails makes the test fail with its stderr; the others are killed, never
left waiting in a collective.

Rank layout: rank = ep_rank * tp_size + tp_rank (TP groups are the inner dimension, as vLLM).
Shape legend: T tokens, E experts, El local experts, K top-k, H hidden, I intermediate, Il = I/tp,
Is shared intermediate, Isl = Is/tp.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import DEFAULT_TARGET
from moegen.artifact import TOLERANCES
from moegen.reference import expert_map_ref, moe_ref, random_weights
from moegen.spec import parse_spec

H, I, E, IS = 48, 32, 8, 16  # irregular small sizes: I/tp = 16 and Is/tp = 8 with tp 2


def make_spec(name: str, *, dtype: str = "float32", top_k: int = 3, activation: str = "silu", **parallel):
    return parse_spec(dict(name=name, dtype=dtype, hidden_size=H, intermediate_size=I, num_experts=E, top_k=top_k,
                           activation=activation, expert_bias=True,
                           shared_experts=dict(intermediate_size=IS, gate="sigmoid"), parallel=parallel))


SPECS = {s.name: s for s in (
    make_spec("par-tp2", tp_size=2),
    make_spec("par-ep2-linear", ep_size=2, expert_placement="linear"),
    make_spec("par-ep2-round_robin", ep_size=2, expert_placement="round_robin"),
    make_spec("par-ep4-linear", top_k=2, ep_size=4, expert_placement="linear"),
    make_spec("par-ep4-round_robin", top_k=2, ep_size=4, expert_placement="round_robin"),
    make_spec("par-tp2-ep2", activation="gelu", tp_size=2, ep_size=2, expert_placement="linear"),
    # relu2 is not gated: w13 holds I rows, not gate rows then up rows (another TP cut)
    make_spec("par-sp-tp2", activation="relu2", tp_size=2, sequence_parallel=True),
    make_spec("par-sp-ep2", ep_size=2, expert_placement="round_robin", sequence_parallel=True),
    make_spec("par-bf16-tp2-ep2", dtype="bfloat16", activation="swigluoai", tp_size=2, ep_size=2,
              expert_placement="round_robin"),
)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """built(name) -> artifact directory, each spec built once for the module (on first use)."""
    from moegen.build import build

    root = tmp_path_factory.mktemp("parallel-artifacts")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = build(SPECS[name], DEFAULT_TARGET, root, golden=False)
        return cache[name]

    return get


# ---- the workers -----------------------------------------------------------------------------

WORKER = textwrap.dedent(r'''
    import sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from moegen.runtime import MoERunner

    job_file, rank, world, store, out_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    jobs = torch.load(job_file)["ranks"][rank]
    results = []
    for job in jobs:
        group = None
        for ranks in job.get("groups") or []:  # every rank creates every group, in the same order
            g = dist.new_group(ranks)
            if rank in ranks:
                group = g
        runner = MoERunner.load(job["artifact"], job["weights"], "cpu", process_group=group, **job["load"])
        outs = []
        for call in job["calls"]:
            out = runner.forward(call["x"], call["logits"], sp_sizes=call.get("sp_sizes"))
            outs.append({"tuple": isinstance(out, tuple), "tensors": list(out) if isinstance(out, tuple) else [out]})
        results.append({"outs": outs, "expert_map": runner.expert_map.clone()})
    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, out_file)
''')


def launch(tmp_path: Path, jobs_per_rank: list[list[dict]], timeout: float = 150.0) -> list[list[dict]]:
    """Run one worker process per rank on its list of jobs; return each rank's results.

    A job: {"artifact", "weights", "load": MoERunner.load kwargs, "calls": [{"x", "logits", "sp_sizes"?}],
    "groups": optional list of rank lists (process groups; the worker uses the one holding its rank)}.
    Any worker exiting non-zero (or the group running past `timeout`) fails the test with every worker's
    stderr; the other workers are killed.
    """
    world = len(jobs_per_rank)
    d = Path(tmp_path) / f"launch-{time.monotonic_ns()}"
    d.mkdir(parents=True)
    (d / "worker.py").write_text(WORKER)
    torch.save({"ranks": jobs_per_rank}, d / "jobs.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", TVM_NUM_THREADS="1", TVM_BIND_THREADS="0")
    procs, logs = [], []
    for r in range(world):
        err = open(d / f"stderr-{r}.txt", "w")
        logs.append(err)
        procs.append(subprocess.Popen(
            [sys.executable, str(d / "worker.py"), str(d / "jobs.pt"), str(r), str(world), str(d / "store"),
             str(d / f"out-{r}.pt")], cwd=d, env=env, stdout=err, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    failed = None
    try:
        while any(p.poll() is None for p in procs):
            bad = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad:
                failed = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f} s"
                break
            time.sleep(0.05)
        else:
            bad = [r for r, p in enumerate(procs) if p.returncode != 0]
            if bad:
                failed = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
    if failed:
        report = "\n".join(f"--- rank {r} (rc {p.returncode}) ---\n{(d / f'stderr-{r}.txt').read_text()[-3000:]}"
                           for r, p in enumerate(procs))
        raise AssertionError(f"parallel workers failed: {failed}\n{report}")
    return [torch.load(d / f"out-{r}.pt") for r in range(world)]


# ---- weights, inputs, comparisons --------------------------------------------------------------

def ranks_of(spec):
    """[(rank, tp_rank, ep_rank)] in rank order."""
    tp, ep = spec.parallel.tp_size, spec.parallel.ep_size
    return [(e * tp + t, t, e) for e in range(ep) for t in range(tp)]


def inputs(spec, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, spec.hidden_size, generator=g).to(getattr(torch, spec.dtype))  # [T, H]
    logits = torch.randn(T, spec.num_experts, generator=g) * 2  # [T, E]
    return x, logits


def local_experts(spec, ep_rank: int) -> list[int]:
    """Global ids of the experts `ep_rank` owns, in local order."""
    m = expert_map_ref(spec, ep_rank)
    return sorted((e for e in range(spec.num_experts) if m[e] >= 0), key=lambda e: int(m[e]))


def tp_cut(spec, t: torch.Tensor, tp_rank: int, dim: int, width: int) -> torch.Tensor:
    """This TP rank's slice of a [.., width, ..] (dim) tensor; gated: of the gate half and of the up half."""
    n = width // spec.parallel.tp_size
    if not spec.gated or t.shape[dim] == width:
        return t.narrow(dim, tp_rank * n, n)
    return torch.cat([t.narrow(dim, tp_rank * n, n), t.narrow(dim, width + tp_rank * n, n)], dim)


def cut_weights(spec, w: dict, tp_rank: int, ep_rank: int, *, bias_zeroed: bool) -> dict:
    """What a caller passes when it cuts the shard itself: this rank's experts, gate rows and up rows of
    w13 (and w13_bias), columns of w2, the shared MLP's TP slice; shared_gate replicated. w2_bias is not
    cut by TP: as is on every TP rank, or (bias_zeroed, vLLM's gpt-oss loader) zero on tp_rank != 0."""
    mine = torch.tensor(local_experts(spec, ep_rank))
    out = dict(w)
    out["w13"] = tp_cut(spec, w["w13"][mine], tp_rank, 1, I)
    out["w2"] = tp_cut(spec, w["w2"][mine], tp_rank, 2, I)
    if spec.expert_bias:
        out["w13_bias"] = tp_cut(spec, w["w13_bias"][mine], tp_rank, 1, I)
        out["w2_bias"] = w["w2_bias"][mine].clone()
        if bias_zeroed and tp_rank != 0:
            out["w2_bias"].zero_()
    if spec.shared_experts is not None:
        out["shared_w13"] = tp_cut(spec, w["shared_w13"], tp_rank, 0, IS)
        out["shared_w2"] = tp_cut(spec, w["shared_w2"], tp_rank, 1, IS)
    return {k: v.contiguous() for k, v in out.items()}


def rank_view(spec, w: dict, tp_rank: int, ep_rank: int) -> dict:
    """Full-E weights whose moe_ref is exactly one rank's partial output: the TP slice of every expert,
    other ranks' experts (and w2_bias off TP rank 0) zeroed; the shared MLP only on EP rank 0."""
    v = dict(w)
    v["w13"] = tp_cut(spec, w["w13"], tp_rank, 1, I)
    v["w2"] = tp_cut(spec, w["w2"], tp_rank, 2, I).clone()
    other = torch.tensor([e for e in range(spec.num_experts) if e not in local_experts(spec, ep_rank)])
    v["w2"][other] = 0
    if spec.expert_bias:
        v["w13_bias"] = tp_cut(spec, w["w13_bias"], tp_rank, 1, I)
        v["w2_bias"] = w["w2_bias"].clone()
        v["w2_bias"][other] = 0
        if tp_rank != 0:
            v["w2_bias"].zero_()
    if spec.shared_experts is not None:
        v["shared_w13"] = tp_cut(spec, w["shared_w13"], tp_rank, 0, IS)
        v["shared_w2"] = tp_cut(spec, w["shared_w2"], tp_rank, 1, IS) * (1 if ep_rank == 0 else 0)
    return v


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.float()
    num = (got.float() - want).norm().item()
    den = want.norm().item()
    return num / den if den > 0 else num


def check(spec, out: dict, ref, what: str) -> None:
    """One worker call's outputs (or their sum over ranks) against the reference."""
    refs = list(ref) if isinstance(ref, tuple) else [ref]
    assert out["tuple"] == isinstance(ref, tuple), what
    assert len(out["tensors"]) == len(refs), what
    tol = TOLERANCES[spec.dtype]
    for name, o, r in zip(("shared", "routed") if len(refs) == 2 else ("routed",), out["tensors"], refs):
        assert tuple(o.shape) == tuple(r.shape), f"{what} {name}: shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        assert o.dtype == getattr(torch, spec.dtype), f"{what} {name}: dtype {o.dtype}"
        assert torch.isfinite(o.float()).all(), f"{what} {name}: non-finite values"
        err = rel_error(o, r)
        assert err <= tol, f"{what} {name}: relative error {err:.3e} > {tol:.1e}"


def summed(outs: list[dict]) -> dict:
    """The sum over ranks of one call's partial outputs (in fp32), as the caller reduces them."""
    return {"tuple": outs[0]["tuple"],
            "tensors": [torch.stack([o["tensors"][i].float() for o in outs]).sum(0).to(outs[0]["tensors"][i].dtype)
                        for i in range(len(outs[0]["tensors"]))]}


def concatenated(outs: list[dict]) -> dict:
    """Sequence parallel: the ranks' outputs of their own tokens, concatenated in rank order."""
    return {"tuple": outs[0]["tuple"],
            "tensors": [torch.cat([o["tensors"][i] for o in outs]) for i in range(len(outs[0]["tensors"]))]}


def job(built, spec, weights, tp_rank, ep_rank, calls, reduce_results=True, **extra) -> dict:
    return dict(artifact=str(built(spec.name)), weights=weights, calls=calls,
                load=dict(tp_rank=tp_rank, ep_rank=ep_rank, reduce_results=reduce_results), **extra)


TOKENS = (1, 7, 40)  # decode path, a few tokens, prefill path


def replicated_calls(spec, seed: int):
    """Every rank gets the same tokens (no sequence parallel)."""
    cases = [inputs(spec, T, seed + T) for T in TOKENS]
    return cases, [dict(x=x, logits=lg) for x, lg in cases]


# ---- preconditions: what the tests rely on really changes the output ----------------------------

def test_bias_and_shared_gate_matter():
    """A w2_bias added twice (once per TP rank), a shared gate ignored, or shared experts counted once
    per EP rank would all be far outside the tolerance: the comparisons below can fail."""
    spec = SPECS["par-tp2"]
    w = random_weights(spec, 1)
    x, lg = inputs(spec, 40, 2)
    shared, routed = moe_ref(spec, w, x, lg)
    twice = dict(w, w2_bias=w["w2_bias"] * 2)
    assert rel_error(moe_ref(spec, twice, x, lg)[1], routed) > 10 * TOLERANCES["bfloat16"]
    no_gate = dict(w, shared_gate=torch.full_like(w["shared_gate"], 0.0))  # sigmoid(0) = 1/2 everywhere
    assert rel_error(moe_ref(spec, no_gate, x, lg)[0], shared) > 10 * TOLERANCES["bfloat16"]
    assert rel_error(2 * shared, shared) > 10 * TOLERANCES["bfloat16"]


# ---- tensor parallel -------------------------------------------------------------------------

def test_tp2_full_and_presharded_weights(built, tmp_path):
    """TP 2: one artifact (kernels for I/2) on both ranks. Full weights (the runner cuts its shard) and
    weights the caller cut (w2_bias as is, or zeroed off TP rank 0 as vLLM's loader does): every rank's
    reduced output is the whole layer's."""
    spec = SPECS["par-tp2"]
    w = random_weights(spec, 3)
    cases, calls = replicated_calls(spec, 100)
    jobs = [[job(built, spec, w, t, e, calls),
             job(built, spec, cut_weights(spec, w, t, e, bias_zeroed=False), t, e, calls),
             job(built, spec, cut_weights(spec, w, t, e, bias_zeroed=True), t, e, calls)]
            for _, t, e in ranks_of(spec)]
    res = launch(tmp_path, jobs)
    for (x, lg), T, i in zip(cases, TOKENS, range(len(TOKENS))):
        ref = moe_ref(spec, w, x, lg)
        for r, t, e in ranks_of(spec):
            for j, kind in enumerate(("full weights", "cut weights", "cut weights, w2_bias zeroed off rank 0")):
                check(spec, res[r][j]["outs"][i], ref, f"tp2 {kind} rank {r} T={T}")


# ---- expert parallel -------------------------------------------------------------------------

@pytest.mark.parametrize("ep", [2, 4])
@pytest.mark.parametrize("placement", ["linear", "round_robin"])
def test_ep(ep, placement, built, tmp_path):
    """EP: rank r owns E/ep experts (linear or round robin); full and caller-cut weights; a batch whose
    tokens all go to EP rank 0's experts leaves the other ranks without local tokens."""
    spec = SPECS[f"par-ep{ep}-{placement}"]
    w = random_weights(spec, 4 + ep)
    cases, calls = replicated_calls(spec, 200 + ep)
    x, lg = inputs(spec, 9, 300)
    owned0 = local_experts(spec, 0)
    lg[:, owned0] += 20  # every top-k choice is one of rank 0's experts (El >= K here)
    assert len(owned0) >= spec.top_k
    cases.append((x, lg))
    calls.append(dict(x=x, logits=lg))
    jobs = [[job(built, spec, w, t, e, calls),
             job(built, spec, cut_weights(spec, w, t, e, bias_zeroed=False), t, e, calls)]
            for _, t, e in ranks_of(spec)]
    res = launch(tmp_path, jobs)
    for r, t, e in ranks_of(spec):
        assert torch.equal(res[r][0]["expert_map"], expert_map_ref(spec, e)), f"rank {r} expert_map"
    for i, (x, lg) in enumerate(cases):
        ref = moe_ref(spec, w, x, lg)
        for r, t, e in ranks_of(spec):
            for j, kind in enumerate(("full weights", "cut weights")):
                check(spec, res[r][j]["outs"][i], ref, f"ep{ep} {placement} {kind} rank {r} T={x.shape[0]} (call {i})")


# ---- TP x EP ---------------------------------------------------------------------------------

def test_tp2_ep2_reduced_and_partial(built, tmp_path):
    """4 ranks, rank = ep_rank * 2 + tp_rank. reduce_results=True: every rank holds the whole layer.
    reduce_results=False: each rank's output is exactly its partial (TP slice of its experts; shared
    experts only on EP rank 0) and the caller's sum of the four is the whole layer."""
    spec = SPECS["par-tp2-ep2"]
    w = random_weights(spec, 6)
    cases, calls = replicated_calls(spec, 400)
    jobs = [[job(built, spec, w, t, e, calls),
             job(built, spec, cut_weights(spec, w, t, e, bias_zeroed=False), t, e, calls),
             job(built, spec, w, t, e, calls, reduce_results=False)]
            for _, t, e in ranks_of(spec)]
    res = launch(tmp_path, jobs)
    for i, ((x, lg), T) in enumerate(zip(cases, TOKENS)):
        ref = moe_ref(spec, w, x, lg)
        for r, t, e in ranks_of(spec):
            check(spec, res[r][0]["outs"][i], ref, f"tp2 x ep2 full weights rank {r} (tp {t}, ep {e}) T={T}")
            check(spec, res[r][1]["outs"][i], ref, f"tp2 x ep2 cut weights rank {r} (tp {t}, ep {e}) T={T}")
            check(spec, res[r][2]["outs"][i], moe_ref(spec, rank_view(spec, w, t, e), x, lg),
                  f"tp2 x ep2 unreduced rank {r} (tp {t}, ep {e}) T={T}: its partial")
        check(spec, summed([res[r][2]["outs"][i] for r in range(4)]), ref, f"tp2 x ep2 unreduced, summed, T={T}")


def test_reduce_results_false_tp2(built, tmp_path):
    """TP only, reduce_results=False: w2_bias and the shared MLP must be counted once in the sum."""
    spec = SPECS["par-tp2"]
    w = random_weights(spec, 7)
    cases, calls = replicated_calls(spec, 500)
    res = launch(tmp_path, [[job(built, spec, w, t, e, calls, reduce_results=False)] for _, t, e in ranks_of(spec)])
    for i, ((x, lg), T) in enumerate(zip(cases, TOKENS)):
        check(spec, summed([res[r][0]["outs"][i] for r in range(2)]), moe_ref(spec, w, x, lg),
              f"tp2 unreduced, summed, T={T}")


def test_bf16_tp2_ep2(built, tmp_path):
    """bfloat16 (gloo all-reduces bf16), swigluoai with expert biases, round-robin experts, 4 ranks."""
    spec = SPECS["par-bf16-tp2-ep2"]
    w = random_weights(spec, 8)
    cases, calls = replicated_calls(spec, 600)
    res = launch(tmp_path, [[job(built, spec, w, t, e, calls)] for _, t, e in ranks_of(spec)])
    for i, ((x, lg), T) in enumerate(zip(cases, TOKENS)):
        ref = moe_ref(spec, w, x, lg)
        for r, t, e in ranks_of(spec):
            check(spec, res[r][0]["outs"][i], ref, f"bf16 tp2 x ep2 rank {r} T={T}")


# ---- sequence parallel -----------------------------------------------------------------------

SP_SPLITS = [((5, 3), True), ((4, 4), False), ((0, 6), True), ((13, 1), True)]  # (sizes, pass sp_sizes)


@pytest.mark.parametrize("name", ["par-sp-tp2", "par-sp-ep2"])
def test_sequence_parallel(name, built, tmp_path):
    """Each rank passes only its own tokens (unequal counts with sp_sizes; equal ones with the default
    sp_sizes=None; a rank with none): the ranks' outputs, concatenated, are moe_ref of all the tokens."""
    spec = SPECS[name]
    w = random_weights(spec, 9)
    world = len(ranks_of(spec))
    per_rank_calls = [[] for _ in range(world)]
    cases = []
    for k, (sizes, explicit) in enumerate(SP_SPLITS):
        x, lg = inputs(spec, sum(sizes), 700 + k)
        cases.append((x, lg, sizes))
        for r, (xs, ls) in enumerate(zip(x.split(list(sizes)), lg.split(list(sizes)))):
            per_rank_calls[r].append(dict(x=xs.clone(), logits=ls.clone(),
                                          sp_sizes=list(sizes) if explicit else None))
    res = launch(tmp_path, [[job(built, spec, w, t, e, per_rank_calls[r])] for r, t, e in ranks_of(spec)])
    for i, (x, lg, sizes) in enumerate(cases):
        for r in range(world):
            shapes = [tuple(o.shape) for o in res[r][0]["outs"][i]["tensors"]]
            assert all(s[0] == sizes[r] for s in shapes), f"{name} sizes {sizes}: rank {r} returned {shapes}"
        check(spec, concatenated([res[r][0]["outs"][i] for r in range(world)]), moe_ref(spec, w, x, lg),
              f"{name} sizes {sizes}")


# ---- process groups ----------------------------------------------------------------------------

def test_explicit_process_groups(built, tmp_path):
    """A world of 4 ranks as two TP-2 groups ({0, 1} and {2, 3}), each given its process_group and its own
    tokens: each group reduces (and, sequence parallel, gathers) within itself only."""
    spec, sp = SPECS["par-tp2"], SPECS["par-sp-tp2"]
    w, wsp = random_weights(spec, 10), random_weights(sp, 11)
    groups = [[0, 1], [2, 3]]
    data = [inputs(spec, 11, 800 + g) for g in range(2)]  # one batch per group
    sp_data = [inputs(sp, 7, 900 + g) for g in range(2)]
    sizes = [4, 3]
    jobs = []
    for r in range(4):
        g, t = divmod(r, 2)
        x, lg = data[g]
        xs, ls = (a.split(sizes)[t].clone() for a in sp_data[g])
        jobs.append([job(built, spec, w, t, 0, [dict(x=x, logits=lg)], groups=groups),
                     job(built, sp, wsp, t, 0, [dict(x=xs, logits=ls, sp_sizes=sizes)], groups=groups)])
    res = launch(tmp_path, jobs)
    for g in range(2):
        ref = moe_ref(spec, w, *data[g])
        for r in groups[g]:
            check(spec, res[r][0]["outs"][0], ref, f"group {g} rank {r}")
        check(sp, concatenated([res[r][1]["outs"][0] for r in groups[g]]), moe_ref(sp, wsp, *sp_data[g]),
              f"group {g} sequence parallel")


# ---- the harness itself ------------------------------------------------------------------------

def test_worker_failure_surfaces(built, tmp_path):
    """A worker that raises makes the launch fail with its traceback, and a rank left waiting in a
    collective is killed rather than hanging the test."""
    spec = SPECS["par-tp2"]
    w = random_weights(spec, 12)
    bad = dict(w, w2=w["w2"][:, :, :-1].contiguous())
    x, lg = inputs(spec, 3, 1000)
    calls = [dict(x=x, logits=lg)]
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as e:
        launch(tmp_path, [[job(built, spec, bad, 0, 0, calls)], [job(built, spec, w, 1, 0, calls)]])
    msg = str(e.value)
    assert "rank 0 exited" in msg and "RunnerInputError" in msg and "w2" in msg, msg
    assert time.monotonic() - t0 < 60
