"""The decode path without the sort (config `sort: false`): routing writes the dispatch buffers itself
(route_dispatch, twin reference.dispatch_unsorted_ref), slot s is block s, and no dispatch kernel runs.

Shape legend: T tokens, E experts, El local experts, K top-k, S = T*K slots (= MB, the blocks).
Checked on the CPU build (the thread-per-token routing); the GPU's warp routing variant is checked on the
H100 by scripts/gpu_check.py, and here only for building into the CUDA artifact.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import yaml

from conftest import DEFAULT_TARGET
from moegen import reference as R
from moegen.artifact import TOLERANCES, read_manifest
from moegen.kernels.experts import ExpertShapes
from moegen.kernels.routing import routing_func
from moegen.runtime import MoERunner
from moegen.schedule.config import ExpertsConfig, config_ok
from moegen.spec import RouterSpec, parse_spec
from test_kernels import CPU, compile_one, rel, tie_free_logits

TOKENS = (1, 3, 17, 130)
POISON = -7

# one row per block without the sort for up to 1.5 rows per local expert, then the sorted CPU path
SCHEDULE = {"paths": [
    {"name": "nosort", "max_rows_per_expert": 1.5,
     "experts": {"block_m": 1, "block_n_up": 16, "block_n_down": 16, "combine_n": 16, "grid_blocks": True,
                 "sort": False}},
    {"name": "sorted", "max_rows_per_expert": None,
     "experts": {"block_m": 4, "block_n_up": 16, "block_n_down": 16, "combine_n": 16}},
]}


@functools.cache
def route_dispatch_kernel(E: int, K: int):
    return compile_one(routing_func(E, K, RouterSpec(), dispatch=True), "route_dispatch", CPU.routing)


@pytest.mark.parametrize("ep,placement", [(1, "linear"), (2, "linear"), (4, "round_robin")])
@pytest.mark.parametrize("T", TOKENS)
def test_route_dispatch_matches_twins(ep, placement, T):
    E, K = 16, 3
    spec = parse_spec(dict(name="d", dtype="float32", hidden_size=8, intermediate_size=8, num_experts=E, top_k=K,
                           parallel=dict(ep_size=ep, expert_placement=placement)))
    gen = torch.Generator().manual_seed(T + ep)
    logits = tie_free_logits(T, E, gen)
    want_ids, want_w = R.route_ref(logits, RouterSpec(), K)
    for rank in range(ep):
        emap = R.expert_map_ref(spec, rank)
        i32 = dict(dtype=torch.int32)
        ids, w = torch.full((T, K), POISON, **i32), torch.full((T, K), float("nan"))
        out = dict(sorted_ids=torch.full((T * K,), POISON, **i32), block_expert=torch.full((T * K,), POISON, **i32),
                   num_blocks=torch.full((1,), POISON, **i32), slot_pos=torch.full((T * K,), POISON, **i32))
        route_dispatch_kernel(E, K)(logits, torch.zeros(E), emap, ids, w, *out.values())
        assert torch.equal(ids, want_ids)
        assert rel(w, want_w) <= TOLERANCES["float32"]
        want = R.dispatch_unsorted_ref(want_ids, emap)
        for name in want:
            assert torch.equal(out[name], want[name]), name
        if ep > 1:  # the EP cases do route slots to other ranks' experts
            assert (want["block_expert"] < 0).any() or T == 1


def test_sort_false_needs_one_row_blocks_on_the_grid():
    shapes = ExpertShapes(dtype="bfloat16", local_experts=8, top_k=2, hidden=64, intermediate=32, activation="silu",
                          swiglu_alpha=1.702, swiglu_limit=7.0, expert_bias=False, weight_on_input=False)
    base = ExpertsConfig(block_m=1, block_n_up=16, block_n_down=16, combine_n=16, grid_blocks=True, sort=False)
    assert config_ok(base, shapes) is None
    assert "sort false needs block_m 1" in config_ok(dataclasses.replace(base, block_m=4), shapes)
    assert "grid_blocks true" in config_ok(dataclasses.replace(base, grid_blocks=False), shapes)


@pytest.fixture(scope="module")
def nosort_build(tmp_path_factory):
    """build(spec) -> CPU artifact of `spec` with SCHEDULE (built once per spec name)."""
    from moegen.build import build

    root = tmp_path_factory.mktemp("nosort")
    sched = root / "schedules.yaml"
    sched.write_text(yaml.safe_dump(SCHEDULE, sort_keys=False))
    cache = {}

    def get(spec):
        if spec.name not in cache:
            cache[spec.name] = build(spec, DEFAULT_TARGET, root, golden=False, schedules=sched)
        return cache[spec.name]

    return get


def _spec(name: str, **parallel):
    return parse_spec(dict(name=name, dtype="float32", hidden_size=48, intermediate_size=32, num_experts=8, top_k=3,
                           activation="swigluoai", expert_bias=True, parallel=parallel))


def test_artifact_has_route_dispatch_and_no_dispatch_for_the_unsorted_path(nosort_build):
    fns = set(read_manifest(nosort_build(_spec("nosort-one")))["functions"])
    assert {"routing", "route_dispatch_nosort", "dispatch_sorted"} <= fns
    assert "dispatch_nosort" not in fns


@pytest.mark.parametrize("ep,placement", [(1, "linear"), (2, "linear"), (2, "round_robin")])
def test_unsorted_path_matches_the_layer_reference(ep, placement, nosort_build):
    spec = _spec(f"nosort-ep{ep}-{placement}", ep_size=ep, expert_placement=placement)
    root = nosort_build(spec)
    weights = R.random_weights(spec, seed=3)
    runners = [MoERunner.load(root, weights, ep_rank=r, reduce_results=False) for r in range(ep)]
    # record which kernels run, to be sure the tokens below take the unsorted path (T*K/El <= 1.5 is T <= 4
    # at ep 1 and T <= 2 at ep 2) and then the sorted one
    calls = []
    for r in runners:
        for name, fn in list(r._fns.items()):
            r._fns[name] = (lambda n, f: lambda *a: (calls.append(n), f(*a))[1])(name, fn)
    gen = torch.Generator().manual_seed(11)
    for T in (1, 2, 3, 40):
        x = torch.randn(T, spec.hidden_size, generator=gen)
        logits = torch.randn(T, spec.num_experts, generator=gen)
        calls.clear()
        got = sum(r(x, logits) for r in runners)
        unsorted = T * spec.top_k / spec.local_experts <= 1.5
        assert ("route_dispatch_nosort" in calls) == unsorted and ("dispatch_sorted" in calls) != unsorted
        assert "dispatch_nosort" not in calls
        assert rel(got, R.moe_ref(spec, weights, x, logits)) <= TOLERANCES["float32"], (T, ep)


def test_cuda_artifacts_decode_without_the_sort(artifact):
    """The shipped GPU schedules' decode path builds as route_dispatch + guarded expert kernels."""
    root = artifact("tiny", "cuda-sm90")
    m = read_manifest(root)
    nosort = [p["name"] for p in m["paths"] if not p["config"].get("sort", True)]
    assert nosort, "the sm90 schedules decode without the sort"
    for name in nosort:
        assert f"route_dispatch_{name}" in m["functions"] and f"dispatch_{name}" not in m["functions"]
    src = (root / "moe.cu").read_text()
    # blocks of another EP rank's experts exit with the blocks past num_blocks
    assert "(0 <= block_expert_ptr[((int64_t)blockIdx.y)])" in src
