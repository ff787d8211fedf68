"""Hopper wgmma expert kernels (kernels/experts_wgmma.py) on the CPU box: config checks and fitting,
the generated CUDA (warpgroup MMA from swizzled shared memory, a cp.async ring, no shared accumulator),
sm_90a machine code, and the refusals (other targets at build, other GPUs at load). Their numbers are
checked on the H100 (scripts/gpu_check.py on scripts/specs/wgmma-*.yaml, `moegen tune run`; docs/perf.md)."""

from __future__ import annotations


import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from conftest import kernel_source as _kernel
from moegen.artifact import ArtifactError, fatbin_entries, read_manifest
from moegen.build import build, expert_shapes
from moegen.schedule.config import ExpertsConfig, ScheduleError, config_ok, fit_config
from moegen.spec import load_spec

SCRIPT_SPECS = Path(__file__).resolve().parents[1] / "scripts" / "specs"
WG = dict(block_m=128, block_n_up=128, block_n_down=128, combine_n=128, gather_rows=False, grid_blocks=True,
          dispatch_threads=128, dispatch_tile=128, mma=True, wgmma=True, block_k=64, warp_m=64, warp_n=64,
          stages=3, dynamic_smem=True)


def _shapes(name: str, **change):
    return expert_shapes(dataclasses.replace(load_spec(SCRIPT_SPECS / f"{name}.yaml"), **change))


def test_config_ok_names_the_wgmma_limits():
    shapes = _shapes("wgmma-silu-small")  # Hp 320, I 192, gated
    ok = dict(WG, block_n_up=128, block_n_down=64, combine_n=64)
    assert config_ok(ExpertsConfig(**ok), shapes) is None
    for bad, why in ((dict(mma=False), "wgmma needs mma true"),
                     (dict(block_m=96), "block_m 96 is not a multiple of 64"),
                     (dict(block_n_down=32), "block_n_down 32 x wgmma_span 1 must be a multiple of 64"),
                     (dict(block_n_up=384), "block_n_up 384 x wgmma_span 1 must be a multiple of 64 and at most 256"),
                     (dict(wgmma_span=3), "block_n_up 128 x wgmma_span 3 must be a multiple of 64 and at most 256"),
                     (dict(wgmma_span=0), "wgmma_span 0 < 1"),
                     (dict(block_n_up=64, wgmma_span=2), "block_n_down 64 x wgmma_span 2 does not divide the 320 columns"),
                     (dict(stages=2), "stages 2 < 3"),
                     (dict(stages=8), "shared memory (at most"),
                     (dict(sort=False, block_m=1, split_k=1), "wgmma needs sort true"),
                     (dict(block_n_up=256), "does not divide")):
        got = config_ok(ExpertsConfig(**dict(ok, **bad)), shapes)
        assert got is not None and why in got, (bad, got)
    assert "reduction step 64 does not divide I 96" in config_ok(
        ExpertsConfig(**dict(ok, block_n_up=64)), _shapes("wgmma-silu-small", intermediate_size=96))
    assert "routing weight on the input" in config_ok(
        ExpertsConfig(**ok), dataclasses.replace(shapes, weight_on_input=True))
    assert "float16 or bfloat16" in config_ok(ExpertsConfig(**ok), dataclasses.replace(shapes, dtype="float32"))
    assert "wgmma_staged_store needs the classic loop" in config_ok(
        ExpertsConfig(**dict(ok, wgmma_staged_store=True, warp_specialized=True)), shapes)
    assert config_ok(ExpertsConfig(**dict(ok, wgmma_staged_store=True)), shapes) is None
    # three consumer warpgroups and a producer, 128 accumulators each: past a multiprocessor's registers
    relu2 = _shapes("ws/wgmma-ws-relu2-small-fp16")  # Hp 512, I 256
    big = ExpertsConfig(**dict(WG, block_m=192, wgmma_span=2, warp_specialized=True))
    assert "512 threads holding 128 accumulators each" in config_ok(big, relu2)
    assert config_ok(dataclasses.replace(big, block_m=128, stages=4), relu2) is None
    # three warpgroups issue the copies of a 64 x 256 weight step: 2048 over 384 threads, 6 rounds, the
    # last guarded (test_a_192_row_block_guards_its_last_round_of_weight_copies)
    assert config_ok(ExpertsConfig(**dict(WG, block_m=192, wgmma_span=2, stages=3)), relu2) is None


def test_fit_config_takes_the_span_both_gemms_divide():
    span = ExpertsConfig(**dict(WG, block_n_up=64, block_n_down=64, wgmma_span=2))
    assert fit_config(span, _shapes("ws/wgmma-ws-relu2-small-fp16")).wgmma_span == 2  # 256 | 256 and 128 | 512
    f = fit_config(span, _shapes("wgmma-silu-small"))  # down: 2 x 64 does not divide Hp 320
    assert f.wgmma and f.wgmma_span == 1 and config_ok(f, _shapes("wgmma-silu-small")) is None


def test_fit_config_keeps_whole_atoms_or_falls_back_to_mma_sync():
    gpt = _shapes("wgmma-gptoss-small", hidden_size=2880, intermediate_size=2880)  # gpt-oss-20b, unpadded
    gpt = dataclasses.replace(gpt, hidden=2880)
    f = fit_config(ExpertsConfig(**WG), gpt)  # Hp 2880 = 45 x 64: 64-wide down tiles, not 120
    assert f.wgmma and (f.block_n_up, f.block_n_down) == (128, 64)
    assert fit_config(ExpertsConfig(**dict(WG, block_n_down=256)), gpt).block_n_down == 192
    tiny = expert_shapes(load_spec(Path(__file__).resolve().parents[1] / "examples/specs/tiny.yaml"))  # I 96
    f = fit_config(ExpertsConfig(**dict(WG, warp_n=32)), tiny)  # I 96 is no multiple of the k step 64
    assert not f.wgmma and f.mma and config_ok(f, tiny) is None


@pytest.fixture(scope="module")
def wgmma_artifact(tmp_path_factory):
    """wgmma-silu-small (bf16, gated) and wgmma-relu2-small-fp16 (fp16, relu2) with one wgmma path."""
    out = tmp_path_factory.mktemp("wgmma")
    sched = out / "s.yaml"
    sched.write_text(yaml.safe_dump({"paths": [
        {"name": "w", "max_rows_per_expert": None, "experts": dict(WG, group_m=4, y_model_dtype=True)}]}))
    return {n: build(load_spec(SCRIPT_SPECS / f"{n}.yaml"), "cuda-sm90", out, golden=False, schedules=sched)
            for n in ("wgmma-silu-small", "wgmma-relu2-small-fp16")}


@pytest.mark.parametrize("name,ab", [("wgmma-silu-small", "bf16"), ("wgmma-relu2-small-fp16", "f16")])
def test_wgmma_kernels_use_warpgroup_mma_from_a_cp_async_ring(wgmma_artifact, name, ab):
    root = wgmma_artifact[name]
    m = read_manifest(root)
    (path,) = m["paths"]
    assert path["config"]["wgmma"]
    src = (root / "moe.cu").read_text()
    for fn in ("experts_up_w", "experts_down_w"):
        k = _kernel(src, fn)
        assert f"wgmma.mma_async.sync.aligned.m64n{path['config']['block_n_up' if 'up' in fn else 'block_n_down']}k16" \
               f".f32.{ab}.{ab}" in src
        for piece in ("wgmma_bf16_ss" if ab == "bf16" else "wgmma_f16_ss", "cp_async_cg", "wait_group",
                      "fence_proxy", "__syncthreads"):
            assert piece in k, (fn, piece)
        assert "ldmatrix" not in k and "mma.sync" not in k, fn
        guard = k.index("num_blocks_ptr[0]")
        assert guard < k.index("cp_async") and guard < k.index("block_expert_ptr["), fn
        # the ring asks for its stages plus alignment room, past 48 KiB
        assert f"cudaFuncSetAttribute(::{fn}_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize" in src, fn
    assert f"(int64_t){3 * (128 + 128) * 128 + 1024}" in src  # 3 stages of 128 x 64 + 64 x 128, 1 KiB to align
    # sm_90a machine code (wgmma needs it) plus its PTX, and the manifest says it runs on 9.0 only
    assert "arch=compute_90a,code=sm_90a" in m["compiled"]["nvcc_flags"]
    assert m["target"]["exact_capability"] is True
    assert {(e["kind"], e["arch"]) for e in fatbin_entries(root / "moe.so")} == {("sass", 90), ("ptx", 90)}


def test_plain_cuda_artifacts_stay_portable(artifact):
    m = read_manifest(artifact("tiny", "cuda-sm90"))
    assert "arch=compute_90,code=sm_90" in m["compiled"]["nvcc_flags"] and not m["target"]["exact_capability"]


def test_tuning_skips_wgmma_candidates_outside_hopper():
    """The default candidates file serves every CUDA target: its wgmma tiles are tuned on cuda-sm90 and
    skipped, with the reason, elsewhere."""
    from moegen import tune
    from moegen.targets import load_target

    cfgs = tune.load_candidates_file(tune.CANDIDATES_DIR / "cuda.yaml")
    shapes = expert_shapes(load_spec(Path(__file__).resolve().parents[1] / "examples/specs/qwen3-30b-a3b.yaml"))
    hopper, _ = tune.filter_candidates(cfgs, shapes, load_target("cuda-sm90"))
    ampere, skipped = tune.filter_candidates(cfgs, shapes, load_target("cuda-sm80"))
    n = sum(c["fitted"]["wgmma"] for c in hopper)
    assert n == 4 and len(ampere) == len(hopper) - n and not any(c["fitted"]["wgmma"] for c in ampere)
    assert len(skipped) == n and all("wgmma: true needs a Hopper target (cuda-sm90), not cuda-sm80" in r["why"]
                                     for r in skipped)


def test_wgmma_is_refused_for_non_hopper_targets(tmp_path):
    sched = tmp_path / "s.yaml"
    sched.write_text(yaml.safe_dump({"paths": [{"name": "w", "max_rows_per_expert": None, "experts": WG}]}))
    with pytest.raises(ScheduleError, match="wgmma: true needs a Hopper target .cuda-sm90., not cuda-sm80"):
        build(load_spec(SCRIPT_SPECS / "wgmma-silu-small.yaml"), "cuda-sm80", tmp_path, golden=False,
              schedules=sched)
    assert not list(tmp_path.glob("wgmma-silu-small/cuda-sm80*"))  # nothing half-written


def test_loader_refuses_sm90a_code_on_another_gpu(wgmma_artifact, tmp_path, monkeypatch):
    """An artifact with wgmma kernels runs on compute capability 9.0 only: a newer GPU (10.0) is refused
    before anything loads, with a message naming both."""
    import torch

    from moegen.runtime import loader

    m = read_manifest(wgmma_artifact["wgmma-silu-small"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    with pytest.raises(ArtifactError, match=r"9.0-only code \(wgmma, sm_90a\) and NVIDIA B200 is 10.0"):
        loader.check_device(m, torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    loader.check_device(m, torch.device("cuda", 0))  # an H100: fine


@pytest.fixture(scope="module")
def ws_artifact(tmp_path_factory):
    """scripts/specs/ws/: gpt-oss structure (bf16, gated, biases) and relu2 fp16 with the span, the
    warp-specialised and the 192-row paths of scripts/specs/ws/schedules.yaml (as `make gpu-bundle` builds them)."""
    out = tmp_path_factory.mktemp("ws")
    return {n: build(load_spec(SCRIPT_SPECS / "ws" / f"{n}.yaml"), "cuda-sm90", out, golden=False,
                     schedules=SCRIPT_SPECS / "ws" / "schedules.yaml")
            for n in ("wgmma-ws-gptoss-small", "wgmma-ws-relu2-small-fp16")}


@pytest.mark.parametrize("name", ["wgmma-ws-gptoss-small", "wgmma-ws-relu2-small-fp16"])
def test_span_and_warp_specialised_kernels(ws_artifact, name):
    root = ws_artifact[name]
    m = read_manifest(root)
    src = (root / "moe.cu").read_text()
    assert [p["name"] for p in m["paths"]] == ["span", "ws", "tall", "ws_span"]
    for path in m["paths"]:
        c = path["config"]
        ws = c["warp_specialized"]
        for fn in (f"experts_up_{path['name']}", f"experts_down_{path['name']}"):
            k = _kernel(src, fn)
            w = next(a for a in m["functions"][fn] if a["name"] == "w")
            assert w["shape"][-1] == "128"  # the packed layout stays 128 columns ...
            assert f"m64n{128 * c['wgmma_span']}k16" in k, fn  # ... the MMA spans wgmma_span of its tiles
            args = [a["name"] for a in m["functions"][fn]]
            if not ws:
                # several warpgroups: each skips its MMAs and its epilogue when its first row is padding,
                # the flag read once per tile (one warpgroup: always set; warp-specialised: no flag)
                flag = [ln for ln in k.split("\n") if "live_ptr[0] = " in ln]
                assert len(flag) == 1 and k.count("if (live_ptr[0] != 0)") == 2, fn
                assert (">> (int64_t)7) * (int64_t)64)" in flag[0]) == (c["block_m"] > 64), (fn, flag)
                assert flag[0].strip() == "live_ptr[0] = 1;" or c["block_m"] > 64, (fn, flag)
                assert "mbarrier" not in k and args[-1] == "out", fn
                assert f"__launch_bounds__({c['block_m'] // 64 * 128}) {fn}_kernel(" in src, fn  # tall: 384
                # the staged epilogue: the outputs go through the ring, then whole rows to `out` in 16-byte
                # chunks (adjacent threads along a row) and no 2-byte store to it; a block row holds 256
                # outputs (gated up: 128), so each thread stores BM * 32 (16) chunks / its threads
                assert c["wgmma_staged_store"] and "out_ptr[" not in k, fn
                stores = re.findall(r"\*\(uint4\*\)\(out_ptr \+ .*\) = \*\(uint4\*\)\(ring_ptr \+ ", k)
                row_chunks = 128 * c["wgmma_span"] // 8 // (2 if fn.startswith("experts_up") and "gptoss" in name else 1)
                assert len(stores) == c["block_m"] * row_chunks // (c["block_m"] // 64 * 128), (fn, len(stores))
                # the rows of a padding-only warpgroup are not stored (one warpgroup: every row)
                assert ("sorted_ids_ptr[(blk_ptr[0] * (int64_t)192)" in k) == (c["block_m"] > 64), fn
                continue
            assert "live_ptr" not in k and "uint4" not in k, fn  # registers straight to `out`
            # the persistent grid: the GPU's multiprocessors, a scalar the runner passes last
            assert m["functions"][fn][-1] == {"name": "n_sm", "shape": [], "dtype": "int64"}, fn
            threads = c["block_m"] // 64 * 128 + 128  # consumer warpgroups and the producer
            assert f"__launch_bounds__({threads}) {fn}_kernel(" in src, fn
            for piece in ("mbarrier_init", "mbarrier_wait", "cp_async_mbarrier_arrive_async_mbarrier_arrive_noinc",
                          "ptx_mbarrier_arrive_arrive", "fence_proxy", "blockIdx.x"):
                assert piece in k, (fn, piece)
            # one block-wide barrier (after the mbarriers' init); the ring is paced by the mbarriers
            assert k.count("__syncthreads()") == 1 and "cp_async_wait" not in k, fn


def test_a_192_row_block_guards_its_last_round_of_weight_copies(tmp_path):
    """block_m 192 on the classic loop: 384 threads issue the 2048 16-byte weight copies of a 64 x 256
    step, 6 rounds (5.33), the sixth only for threads whose chunk is below 2048; the A rows split evenly
    (1536 = 4 x 384) and take no guard. 128-row blocks keep unguarded copies (2048 = 8 x 256)."""
    relu2 = load_spec(SCRIPT_SPECS / "ws/wgmma-ws-relu2-small-fp16.yaml")
    for bm, guarded in ((192, True), (128, False)):
        cfg = dict(WG, block_m=bm, wgmma_span=2, stages=3, warp_m=64)
        sched = tmp_path / f"s{bm}.yaml"
        sched.write_text(yaml.safe_dump({"paths": [{"name": "w", "max_rows_per_expert": None, "experts": cfg}]}))
        root = build(relu2, "cuda-sm90", tmp_path / str(bm), golden=False, schedules=sched)
        path = read_manifest(root)["paths"][0]["config"]
        assert path["wgmma"] and path["block_m"] == bm and path["wgmma_span"] == 2, path
        src = (root / "moe.cu").read_text()
        for fn in ("experts_up_w", "experts_down_w"):
            k = _kernel(src, fn)
            assert f"__launch_bounds__({bm // 64 * 128}) {fn}_kernel(" in src, fn
            # the sixth round: chunk 5 * 384 + t < 2048, so threads below 128
            last = re.search(r"if \(\(\(int\)threadIdx\.x\) < 128\) \{\s*tvm_builtin_ptx_cp_async", k)
            assert (last is not None) == guarded, fn


def test_a_padded_up_gemm_ends_its_reduction_at_the_routed_width(tmp_path):
    """hidden 320 padded to 512: w13 is zeros past 320, so the up GEMM takes x [T, 320] (no pad) and runs 5
    k steps of 64, not 8 (gpt-oss-20b: 45 of 48); the down GEMM's output keeps the padded width."""
    sched = tmp_path / "s.yaml"
    sched.write_text(yaml.safe_dump({"paths": [{"name": "w", "max_rows_per_expert": None, "experts": WG}]}))
    root = build(load_spec(SCRIPT_SPECS / "wgmma-padded-small.yaml"), "cuda-sm90", tmp_path, golden=False,
                 schedules=sched)
    m = read_manifest(root)
    src = (root / "moe.cu").read_text()
    a = next(arg for arg in m["functions"]["experts_up_w"] if arg["name"] == "a")
    assert a["shape"][1] == "320"  # x unpadded (the packed w13 keeps its 512 rows per tile)
    w = next(arg for arg in m["functions"]["experts_up_w"] if arg["name"] == "w")
    assert w["shape"][2] == "512"
    up, down = _kernel(src, "experts_up_w"), _kernel(src, "experts_down_w")
    assert "for (int k = 0; k < 5; ++k)" in up and "for (int k = 0; k < 8; ++k)" not in up
    assert "for (int k = 0; k < 3; ++k)" in down  # I 192


def test_runner_passes_the_persistent_grid_to_warp_specialised_kernels(artifact):
    """A warp-specialised path's expert kernels take one more argument, n_sm (their persistent grid):
    the runner passes it after the output buffer, and passes nothing more to the other kernels. Checked
    on the CPU artifact with the path marked warp-specialised and its kernels wrapped (the wrappers drop
    n_sm before the CPU kernels run, so the output must not change)."""
    import torch

    from moegen.reference import random_weights
    from moegen.runtime import MoERunner

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples/specs/tiny.yaml")
    r = MoERunner.load(artifact("tiny"), random_weights(spec, 0))
    x, lg = torch.randn(9, spec.hidden_size).to(getattr(torch, spec.dtype)), torch.randn(9, spec.num_experts)
    want = r(x, lg)
    seen = {}

    def wrap(name, fn, n_args):
        def call(*args):
            seen[name] = args[n_args:]
            return fn(*args[:n_args])
        return call

    for p in r.paths:
        p["config"] = dict(p["config"], warp_specialized=True)
    for name in list(r._fns):
        if name.startswith(("experts_up_", "experts_down_")):
            r._fns[name] = wrap(name, r._fns[name], 8)
        elif name.startswith("combine_"):
            r._fns[name] = wrap(name, r._fns[name], 3)
    got = r(x, lg)
    assert torch.equal(got, want)
    assert seen and all(extra == (r._n_sm,) for n, extra in seen.items() if n.startswith("experts_")), seen
    assert all(extra == () for n, extra in seen.items() if n.startswith("combine_")), seen
