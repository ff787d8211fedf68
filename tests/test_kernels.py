"""Tier 1: each kernel family built for the CPU and compared with its `_ref` twin.

Shape legend: T tokens, E experts, El local experts, K top-k, Hp padded hidden, I intermediate,
BM rows per block, MB blocks at most, MP = MB * BM sorted rows.

Outputs start poisoned (NaN, -7) so a value the kernel forgot to write shows up; rows the kernels
must never read (padding rows of the sorted order) are poisoned with NaN before the next kernel.
Indices are compared exactly on tie-free inputs, floats by the dtype's tolerance.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import tvm
import tvm_ffi

from conftest import DEFAULT_TARGET
from moegen import reference as R
from moegen.artifact import TOLERANCES
from moegen.build import compile_module
from moegen.kernels.dispatch import dispatch_func
from moegen.kernels.experts import ExpertShapes, combine_func, experts_down_func, experts_up_func
from moegen.kernels.pack import pack_w2_func, pack_w13_func
from moegen.kernels.routing import routing_func
from moegen.runtime import packing
from moegen.schedule import rules
from moegen.schedule.config import ExpertsConfig, PackConfig, PackTiles, fit_config, load_paths, pack_config_ok
from moegen.spec import RouterSpec
from moegen.targets import load_target

TOKENS = (0, 1, 3, 17, 129, 1000)
CPU = rules("cpu")
PATHS = load_paths("cpu")


def compile_one(func, name: str, schedule, *args):
    """Schedule one function with the CPU rule and compile it for the native CPU target."""
    sch = schedule(func, name, *args)
    ex = compile_module(tvm.IRModule({name: sch.mod[name]}), load_target(DEFAULT_TARGET))
    return ex[name]


def rel(got, want) -> float:
    want = want.float()
    return ((got.float() - want).norm() / want.norm().clamp(min=1e-30)).item()


def tie_free_logits(T: int, E: int, gen: torch.Generator) -> torch.Tensor:
    """Each row a random permutation of evenly spaced values: choices differ by far more than rounding."""
    return torch.stack([torch.randperm(E, generator=gen).float() * 0.25 - E / 8 for _ in range(T)]) if T else \
        torch.empty(0, E)


# ---- routing ---------------------------------------------------------------------------------

ROUTERS = {
    "softmax": (RouterSpec(), 16, 4),
    "softmax-norenorm-scaled": (RouterSpec(renormalize=False, routed_scaling_factor=2.5), 16, 3),
    "sigmoid": (RouterSpec(scoring="sigmoid"), 12, 2),
    "sigmoid-grouped-bias": (RouterSpec(scoring="sigmoid", num_expert_group=8, topk_group=3, correction_bias=True,
                                        routed_scaling_factor=2.5), 32, 4),
    "softmax-grouped": (RouterSpec(num_expert_group=4, topk_group=2), 16, 4),
    "top1": (RouterSpec(scoring="sigmoid", renormalize=False, apply_weight_on_input=True), 6, 1),
}


@functools.cache
def routing_kernel(key: str):
    router, E, K = ROUTERS[key]
    return compile_one(routing_func(E, K, router), "routing", CPU.routing)


@pytest.mark.parametrize("key", sorted(ROUTERS))
@pytest.mark.parametrize("T", TOKENS)
def test_routing_matches_twin(key, T):
    router, E, K = ROUTERS[key]
    gen = torch.Generator().manual_seed(T * 31 + E)
    logits = tie_free_logits(T, E, gen)
    bias = torch.rand(E, generator=gen) * 0.05 if router.correction_bias else torch.full((E,), float("nan"))
    ids = torch.full((T, K), -7, dtype=torch.int32)
    w = torch.full((T, K), float("nan"))
    routing_kernel(key)(logits, bias, ids, w)
    want_ids, want_w = R.route_ref(logits, router, K, bias if router.correction_bias else None)
    assert torch.equal(ids, want_ids)
    assert rel(w, want_w) <= TOLERANCES["float32"]


def test_routing_bias_changes_choice_not_weights():
    router, E, K = ROUTERS["sigmoid-grouped-bias"]
    gen = torch.Generator().manual_seed(5)
    logits = tie_free_logits(64, E, gen)
    big = torch.zeros(E)
    big[torch.randperm(E, generator=gen)[:K]] = 10.0  # forces these experts whenever their group survives
    ids0, w0 = (torch.empty(64, K, dtype=torch.int32), torch.empty(64, K))
    ids1, w1 = (torch.empty(64, K, dtype=torch.int32), torch.empty(64, K))
    routing_kernel("sigmoid-grouped-bias")(logits, torch.zeros(E), ids0, w0)
    routing_kernel("sigmoid-grouped-bias")(logits, big, ids1, w1)
    assert not torch.equal(ids0, ids1)
    scores = torch.sigmoid(logits).gather(1, ids1.long())
    want = scores / scores.sum(-1, keepdim=True) * router.routed_scaling_factor
    assert rel(w1, want) <= TOLERANCES["float32"]


# ---- dispatch --------------------------------------------------------------------------------


@functools.cache
def dispatch_kernel(E: int, El: int, K: int, BM: int):
    return compile_one(dispatch_func(E, El, K, BM), "dispatch", CPU.dispatch)


def run_dispatch(ids, emap, El, BM):
    T, K = ids.shape
    MB = R.max_blocks(T, K, El, BM)
    out = dict(counts=torch.full((El,), -7, dtype=torch.int32), offsets=torch.full((El + 1,), -7, dtype=torch.int64),
               sorted_ids=torch.full((MB * BM,), -7, dtype=torch.int32),
               block_expert=torch.full((MB,), -7, dtype=torch.int32), num_blocks=torch.full((1,), -7, dtype=torch.int32),
               slot_pos=torch.full((T * K,), -7, dtype=torch.int32))
    dispatch_kernel(emap.numel(), El, K, BM)(ids, emap, *out.values())
    return out


@pytest.mark.parametrize("BM", sorted({p.experts.block_m for p in PATHS} | {4}))
@pytest.mark.parametrize("ep,placement", [(1, "linear"), (2, "linear"), (4, "round_robin")])
@pytest.mark.parametrize("T", TOKENS)
def test_dispatch_matches_twin_exactly(BM, ep, placement, T):
    from moegen.spec import parse_spec

    E, K = 16, 3
    spec = parse_spec(dict(name="d", dtype="float32", hidden_size=8, intermediate_size=8, num_experts=E, top_k=K,
                           parallel=dict(ep_size=ep, expert_placement=placement)))
    gen = torch.Generator().manual_seed(T + BM)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)] or [torch.empty(0, K)])
    ids = ids.reshape(T, K).to(torch.int32)
    for rank in range(ep):
        emap = R.expert_map_ref(spec, rank)
        got = run_dispatch(ids, emap, E // ep, BM)
        want = R.dispatch_ref(ids, emap, E // ep, BM)
        for name in want:
            assert torch.equal(got[name], want[name]), name


# ---- experts ---------------------------------------------------------------------------------

EXPERTS = {
    # name: (dtype, El, K, Hp, I, activation, expert_bias, weight_on_input)
    "bf16-silu": ("bfloat16", 6, 2, 40, 24, "silu", False, False),
    "fp16-gelu-bias": ("float16", 8, 3, 64, 32, "gelu", True, False),
    "fp32-swigluoai-bias": ("float32", 5, 2, 48, 40, "swigluoai", True, False),
    "bf16-relu2": ("bfloat16", 7, 4, 72, 20, "relu2", False, False),
    "fp32-silu-woi": ("float32", 4, 1, 32, 16, "silu", False, True),
}


def shapes_of(key: str) -> ExpertShapes:
    dt, El, K, H, I, act, bias, woi = EXPERTS[key]
    return ExpertShapes(dtype=dt, local_experts=El, top_k=K, hidden=H, intermediate=I, activation=act,
                        swiglu_alpha=1.702, swiglu_limit=3.0, expert_bias=bias, weight_on_input=woi)


@functools.cache
def expert_kernels(key: str, path: str, grid_blocks: bool = False):
    """grid_blocks: the GPU schedules' compute (predicated all-blocks loop, x read without the fp32
    gather stage), run on the CPU."""
    sh = shapes_of(key)
    cfg = fit_config(next(p.experts for p in PATHS if p.name == path), sh)
    if grid_blocks:
        cfg = dataclasses.replace(cfg, gather_rows=False, grid_blocks=True)
    return cfg, (
        compile_one(experts_up_func(sh, cfg.block_m, cfg.block_n_up, cfg.gather_rows, cfg.grid_blocks),
                    "experts_up", CPU.experts_up, cfg),
        compile_one(experts_down_func(sh, cfg.block_m, cfg.block_n_down, grid_blocks), "experts_down",
                    CPU.experts_down, cfg),
        compile_one(combine_func(sh, cfg.block_m), "combine", CPU.combine, cfg),
        dispatch_kernel(sh.local_experts, sh.local_experts, sh.top_k, cfg.block_m),
    )


@pytest.mark.parametrize("key,grid", [(k, False) for k in sorted(EXPERTS)] + [("bf16-silu", True), ("fp32-silu-woi", True),
                                                                             ("fp16-gelu-bias", True)])
@pytest.mark.parametrize("path", [p.name for p in PATHS])
@pytest.mark.parametrize("T", TOKENS)
def test_experts_match_twins(key, grid, path, T):
    sh = shapes_of(key)
    dt = getattr(torch, sh.dtype)
    cfg, (up, down, combine, _) = expert_kernels(key, path, grid)
    El, K, H, I, BM = sh.local_experts, sh.top_k, sh.hidden, sh.intermediate, cfg.block_m
    gen = torch.Generator().manual_seed(T * 7 + El)
    x = torch.randn(T, H, generator=gen).to(dt)
    ids, tw = R.route_ref(tie_free_logits(T, El, gen), RouterSpec(renormalize=K > 1), K)
    emap = torch.arange(El, dtype=torch.int32)
    d = run_dispatch(ids, emap, El, BM)
    w13 = (torch.randn(El, sh.n13, H, generator=gen) * 2 / H ** 0.5).to(dt)
    b13 = torch.randn(El, sh.n13, generator=gen).to(dt) if sh.expert_bias else torch.zeros(El, sh.n13, dtype=dt)
    w2 = (torch.randn(El, H, I, generator=gen) / I ** 0.5).to(dt)
    b2 = torch.randn(El, H, generator=gen).to(dt) if sh.expert_bias else torch.zeros(El, H, dtype=dt)
    MP = d["sorted_ids"].numel()
    real = d["sorted_ids"] < T * K  # rows holding a slot; the rest is padding
    act = torch.full((MP, I), float("nan"), dtype=dt)
    up(x, tw, d["sorted_ids"], d["block_expert"], d["num_blocks"], packing.pack_w13(w13, cfg.block_n_up, sh.gated),
       packing.pack_b13(b13, cfg.block_n_up, sh.gated), act)
    want_act = R.experts_up_ref(x, tw, d, w13, b13 if sh.expert_bias else None, BM, sh.activation, 1.702, 3.0,
                                sh.weight_on_input)
    tol = TOLERANCES[sh.dtype]
    assert rel(act[real], want_act[real]) <= tol
    act[~real] = float("nan")  # padding rows: the next kernels must never read them into an output
    y = torch.full((MP, H), float("nan"))
    down(act, tw, d["sorted_ids"], d["block_expert"], d["num_blocks"], packing.pack_w2(w2, cfg.block_n_down),
         packing.pack_b2(b2, cfg.block_n_down), y)
    y[~real] = float("nan")
    out = torch.full((T, H), float("nan"), dtype=dt)
    combine(y, d["slot_pos"], out)
    want = R.experts_down_ref(act.float().nan_to_num(), tw, d, w2, b2 if sh.expert_bias else None, BM,
                              sh.weight_on_input)
    assert torch.isfinite(out).all()
    assert rel(out, want) <= tol


def test_experts_ep_slots_of_other_ranks_add_zero():
    """A slot whose expert lives on another EP rank has slot_pos -1: combine adds nothing for it."""
    key = "bf16-silu"
    sh = shapes_of(key)
    cfg, (_, _, combine, _) = expert_kernels(key, "prefill")
    T, K, H = 9, sh.top_k, sh.hidden
    MP = R.max_blocks(T, K, sh.local_experts, cfg.block_m) * cfg.block_m
    y = torch.randn(MP, H)
    pos = torch.randperm(MP)[: T * K].to(torch.int32)
    pos[::2] = -1
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16)
    combine(y, pos, out)
    want = torch.where((pos >= 0)[:, None], y[pos.long().clamp(min=0)], 0).view(T, K, H).sum(1)
    assert rel(out, want) <= TOLERANCES["bfloat16"]


def test_schedules_allocate_no_token_sized_buffers():
    """Kernels never allocate: every buffer that grows with T is an argument; what the schedules
    allocate inside are register/cache tiles whose size does not depend on T."""
    sh = shapes_of("bf16-silu")
    for p in PATHS:
        cfg = fit_config(p.experts, sh)
        for func, sched in ((experts_up_func(sh, cfg.block_m, cfg.block_n_up), CPU.experts_up),
                            (experts_down_func(sh, cfg.block_m, cfg.block_n_down), CPU.experts_down),
                            (combine_func(sh, cfg.block_m), CPU.combine)):
            mod = sched(func, "f", cfg).mod
            passes = tvm.s_tir.transform
            seq = tvm.transform.Sequential([passes.PlanAndUpdateBufferAllocationLocation(),
                                            passes.ConvertBlocksToOpaque(), passes.CompactBufferAllocation()])
            allocs = [ln for ln in seq(mod).script().splitlines() if "alloc_buffer" in ln]
            assert allocs, "expected register tiles"
            for line in allocs:
                assert "T_1" not in line and "num_blocks" not in line, line


@pytest.mark.parametrize("gated", [True, False])
def test_packing_in_expert_chunks_matches_the_layout(gated, monkeypatch):
    """Weights pack a chunk of experts per copy (few launches at load); chunks of 2 of 5 experts
    (a ragged last chunk) give exactly the tile layout kernels/experts.py documents."""
    monkeypatch.setattr(packing, "CHUNK_BYTES", 2 * (96 if gated else 48) * 40 * 4)
    g = torch.Generator().manual_seed(3)
    w13 = torch.randn(5, 96 if gated else 48, 40, generator=g)
    got = packing.pack_w13(w13, 16, gated)
    E, N, H = w13.shape
    for e in range(E):
        for t in range(N // 16):
            for c in range(16):
                col = (t * 8 + c if c < 8 else N // 2 + t * 8 + c - 8) if gated else t * 16 + c
                assert torch.equal(got[e, t, :, c], w13[e, col]), (e, t, c)
    w2 = torch.randn(5, 48, 24, generator=g)
    monkeypatch.setattr(packing, "CHUNK_BYTES", 2 * 48 * 24 * 4)
    got2 = packing.pack_w2(w2, 16)
    for e in range(5):
        for t in range(3):
            assert torch.equal(got2[e, t], w2[e, t * 16:(t + 1) * 16].T)


# ---- weight packing ----------------------------------------------------------------------------

# name: (dtype, El, N13 rows, Hp, I, BN up, BN down, gated); Hp and I not powers of two, BN / 2 odd once
PACKS = {
    "bf16-gated": ("bfloat16", 3, 2 * 24, 40, 24, 16, 8, True),
    "bf16-gated-odd-half": ("bfloat16", 4, 2 * 30, 72, 30, 10, 24, True),
    "fp16-relu2": ("float16", 5, 20, 72, 20, 4, 24, False),
    "fp32-gated": ("float32", 3, 2 * 48, 48, 48, 32, 16, True),
    "fp32-relu2-wide": ("float32", 3, 96, 40, 96, 96, 40, False),
}
# a tile larger than the widths and one that splits them (fit_pack shrinks tiles and the vector)
PACK_CONFIGS = [PackConfig(tile_k=16, tile_n=64), PackConfig(tile_k=8, tile_n=8, vector_bytes=4)]


@functools.cache
def pack_kernels(key: str, cfg: PackConfig):
    dt, El, N13, H, I, up, down, gated = PACKS[key]
    return (compile_one(pack_w13_func(dt, El, N13, H, up, gated), "pack_w13", CPU.pack, cfg),
            compile_one(pack_w2_func(dt, El, H, I, down), "pack_w2", CPU.pack, cfg))


@pytest.mark.parametrize("cfg", PACK_CONFIGS, ids=["wide-tiles", "small-tiles"])
@pytest.mark.parametrize("key", sorted(PACKS))
def test_pack_kernels_match_torch_packing_bit_for_bit(key, cfg):
    """The pack kernels (kernels/pack.py, CPU schedule) write every element of `out` exactly as
    runtime/packing.py does (outputs start as NaN, so an element never written fails)."""
    dt, El, N13, H, I, up, down, gated = PACKS[key]
    tdt = getattr(torch, dt)
    gen = torch.Generator().manual_seed(El * 1000 + H)
    w13 = torch.randn(El, N13, H, generator=gen).to(tdt)
    w2 = torch.randn(El, H, I, generator=gen).to(tdt)
    pack13, pack2 = pack_kernels(key, cfg)
    out13 = torch.full((El, N13 // up, H, up), float("nan"), dtype=tdt)
    out2 = torch.full((El, H // down, I, down), float("nan"), dtype=tdt)
    pack13(w13, out13)
    pack2(w2, out2)
    want13, want2 = packing.pack_w13(w13, up, gated), packing.pack_w2(w2, down)
    assert not out13.isnan().any() and not out2.isnan().any()
    assert torch.equal(out13.view(torch.int16 if tdt != torch.float32 else torch.int32),
                       want13.view(torch.int16 if tdt != torch.float32 else torch.int32))
    assert torch.equal(out2.view(torch.int16 if tdt != torch.float32 else torch.int32),
                       want2.view(torch.int16 if tdt != torch.float32 else torch.int32))


def test_pack_kernel_indexes_in_int64():
    """Real layers pass 2**31 elements (DeepSeek-V3 w13: 256 x 4096 x 7168): every extent and index of
    the pack kernels is int64, so no product wraps."""
    for func in (pack_w13_func("bfloat16", 256, 4096, 7168, 128, True), pack_w2_func("bfloat16", 256, 7168, 2048, 128)):
        text = func.script()
        assert "int32" not in text and "T.int64(7168)" in text, text


def test_fit_pack_shrinks_tiles_and_vector_to_divisors():
    from moegen.schedule.config import PACK_MAX_THREADS, fit_pack

    cfg = PackConfig(tile_k=64, tile_n=64)
    assert fit_pack(cfg, 2, 7168, 64) == PackTiles(8, 64, 64)  # DeepSeek-V3 w13, bf16
    assert fit_pack(cfg, 4, 7168, 64) == PackTiles(4, 64, 64)  # fp32: 4 elements a 16-byte access
    assert fit_pack(cfg, 2, 40, 12) == PackTiles(4, 40, 12)  # 12 columns: 8-byte accesses
    assert fit_pack(cfg, 2, 30, 5) == PackTiles(1, 30, 5)
    t = fit_pack(PackConfig(tile_k=1024, tile_n=1024), 2, 4096, 1024)
    assert t.threads <= PACK_MAX_THREADS and 4096 % t.tile_k == 0 and 1024 % t.tile_n == 0
    assert pack_config_ok(PackConfig(tile_k=48, tile_n=64)) == "pack: tile_k 48 must be a power of two"
