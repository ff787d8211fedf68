"""CUDA code generation on the CPU box (no GPU): artifacts build ahead of time with nvcc, embed machine
code (SASS) for the named architecture plus its PTX, and refuse to load where they cannot run.
Correctness on a GPU is checked on the H100 (docs/perf.md), never in CI."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import SPECS, kernel_source as _kernel
from moegen.artifact import ArtifactError, fatbin_entries, read_manifest
from moegen.reference import random_weights
from moegen.runtime import MoERunner
from moegen.spec import load_spec


@pytest.mark.parametrize("target,arch", [("cuda-sm90", 90), ("cuda-sm80", 80)])
def test_cuda_artifact_embeds_sass_and_ptx(target, arch, artifact):
    root = artifact("tiny", target)
    m = read_manifest(root)
    assert m["target"]["family"] == "cuda" and m["target"]["tvm"]["arch"] == f"sm_{arch}"
    embedded = fatbin_entries(root / "moe.so")
    assert {"kind": "sass", "arch": arch} in embedded, embedded
    assert {"kind": "ptx", "arch": arch} in embedded, embedded
    assert {(e["kind"], e["arch"]) for e in embedded} == {("sass", arch), ("ptx", arch)}
    assert m["compiled"]["embedded"] == [{"kind": "ptx", "arch": arch}, {"kind": "sass", "arch": arch}]
    # nothing to compile at load: the kernels ship as machine code, the source only for inspection
    assert (root / "moe.cu").is_file() and "moe.so" in m["files"]
    assert m["runtime_libraries"] == []  # needs only tvm-ffi and the CUDA runtime torch already loads


def test_cpu_library_has_no_cuda_code(artifact):
    assert fatbin_entries(artifact("tiny") / "moe.so") == []


def test_cuda_artifact_refused_on_the_cpu(artifact):
    root = artifact("tiny", "cuda-sm90")
    weights = random_weights(load_spec(SPECS / "tiny.yaml"), 0)
    with pytest.raises(ArtifactError, match="runs on a CUDA GPU"):
        MoERunner.load(root, weights, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ArtifactError, match="needs a CUDA GPU"):
            MoERunner.load(root, weights, device="cuda")


def test_cuda_functions_keep_the_token_count_symbolic(artifact):
    m = read_manifest(artifact("tiny", "cuda-sm90"))
    first = m["paths"][0]["name"]
    x = next(a for a in m["functions"][f"experts_up_{first}"] if a["name"] == "x")
    assert not x["shape"][0].isdigit() and x["shape"][1] == "128"


def test_gpu_routing_is_a_warp_per_token_grouped_or_not(artifact):
    """schedules/cuda.yaml asks for warp routing: shuffles in the routing kernel, for grouped top-k
    (DeepSeek) too, whose group scores are warp merges. (Their numbers are checked on a GPU:
    scripts/gpu_check.py.)"""
    plain = (artifact("tiny", "cuda-sm90") / "moe.cu").read_text()
    grouped = (artifact("deepseek-v3-small", "cuda-sm90") / "moe.cu").read_text()

    def routing(src: str) -> str:  # the routing kernel's definition, up to the next kernel
        start = src.index("routing_kernel(", src.index("routing_kernel(") + 1)
        end = src.find('extern "C" __global__', start)
        return src[start:end if end > 0 else None]

    assert "__shfl_xor_sync" in routing(plain)
    g = routing(grouped)
    assert "__shfl_xor_sync" in g and "gscore" in g and "gkeep" in g


def test_gpu_decode_routing_ranks_with_a_thread_per_expert(artifact):
    """routing.route_dispatch: rank (the shipped GPU schedules): the decode path's route_dispatch is one
    thread block per token with a thread per expert (E rounded up to whole warps), picks by rank in
    shared memory with block reductions for the softmax and no K rounds of shuffled argmaxes; grouped
    top-k keeps its groups' best two; the sorted paths' routing kernel stays a warp per token. (Their
    numbers are checked on a GPU against route_ref, ties and NaN rows too: scripts/gpu_check.py.)"""
    for name, threads in (("tiny", 32), ("deepseek-v3-small", 32)):
        src = (artifact(name, "cuda-sm90") / "moe.cu").read_text()
        start = src.index("route_dispatch_t1_kernel(", src.index("route_dispatch_t1_kernel(") + 1)
        end = src.find('extern "C" __global__', start)
        body = src[src.rindex("extern", 0, start):end if end > 0 else None]
        assert f"__launch_bounds__({threads}) route_dispatch_t1_kernel" in body
        assert "__syncthreads()" in body and "ch_ptr[((int)threadIdx.x)] = " in body  # choices in shared memory
        assert "pick_w" not in body  # (the warp kernel's per-lane picks)
        assert ("gtop_ptr" in body and "gsec_ptr" in body) == (name == "deepseek-v3-small")
        routing = src[src.index("routing_kernel(", src.index("routing_kernel(") + 1):]
        assert "pick_w" in routing[:routing.find('extern "C" __global__')]


@pytest.mark.parametrize("E, K, router", [
    (8, 2, {}), (60, 4, {"renormalize": False}), (33, 3, {"scoring": "sigmoid", "routed_scaling_factor": 2.5}),
    (256, 8, {"scoring": "sigmoid", "correction_bias": True, "num_expert_group": 8, "topk_group": 4,
              "routed_scaling_factor": 2.5}),
    (64, 6, {"num_expert_group": 4, "topk_group": 2, "renormalize": False}),
])
def test_rank_routing_compiles_for_every_router_option(E, K, router):
    """routing_rank_func lowers to CUDA for experts that fill warps or not, with and without
    renormalising, sigmoid scores, grouped top-k with a best-two group score or a best one (the numbers:
    scripts/gpu_check.py's route_dispatch check on a GPU)."""
    import tvm

    from moegen.kernels.routing import routing_rank_func
    from moegen.schedule import cuda
    from moegen.spec import RouterSpec

    for dispatch in (True, False):
        name = "route_dispatch" if dispatch else "routing"
        sch = cuda.routing_warps(routing_rank_func(E, K, RouterSpec(**router), dispatch), name)
        ex = tvm.compile(tvm.IRModule({name: sch.mod[name]}), target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
        src = ex.mod.imports[0].inspect_source()
        assert f"__launch_bounds__({(E + 31) // 32 * 32}) {name}_kernel" in src


# ---- tensor cores ----------------------------------------------------------------------------------

MMA_PTX = "mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32"


@pytest.mark.parametrize("dtype,ab", [("bfloat16", "bf16"), ("float16", "f16")])
def test_tensor_core_paths_use_ldmatrix_and_mma(dtype, ab, tmp_path):
    """The shipped cuda-sm90 schedule runs its multi-row paths on tensor cores: both expert GEMMs load
    fragments with ldmatrix and multiply with mma.sync m16n8k16 in the spec's dtype (fp32 accumulate);
    the one-row decode path stays on CUDA cores; blocks past num_blocks exit before touching memory."""
    import dataclasses

    from moegen.build import build

    spec = dataclasses.replace(load_spec(SPECS / "tiny.yaml"), dtype=dtype)
    root = build(spec, "cuda-sm90", tmp_path)
    paths = [(p["name"], p["config"]) for p in read_manifest(root)["paths"]]
    decode, tc = paths[0], next((n, c) for n, c in paths if c["mma"])
    assert decode[1]["block_m"] == 1 and not decode[1]["mma"]
    src = (root / "moe.cu").read_text()
    for fn in (f"experts_up_{tc[0]}", f"experts_down_{tc[0]}"):
        k = _kernel(src, fn)
        assert MMA_PTX.format(ab=ab) in k and "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in k, fn
        guard = k.index("num_blocks_ptr[0]")
        assert guard < k.index("ldmatrix") and guard < k.index("block_expert_ptr["), fn
    assert "mma.sync" not in _kernel(src, f"experts_up_{decode[0]}")


def test_dynamic_shared_memory_tiles_pass_48_kib(tmp_path):
    """dynamic_smem: a 128 x 128 tile with a 4-stage pipeline (about 138 KiB) builds, its operands and
    accumulator in the one dynamic shared buffer, and the launch raises the kernel's shared-memory limit
    past 48 KiB first; without dynamic_smem the same config is refused by config_ok."""
    import dataclasses

    import yaml

    from moegen.build import build, expert_shapes
    from moegen.schedule.config import ExpertsConfig, config_ok

    big = dict(block_m=128, block_n_up=128, block_n_down=128, combine_n=128, gather_rows=False, grid_blocks=True,
               dispatch_threads=256, mma=True, block_k=32, warp_m=64, warp_n=64, stages=4, dynamic_smem=True)
    spec = dataclasses.replace(load_spec(SPECS / "tiny.yaml"), intermediate_size=128)  # N13 256: two tiles
    shapes = expert_shapes(spec)
    assert config_ok(ExpertsConfig(**big), shapes) is None
    assert "dynamic_smem allows more" in config_ok(ExpertsConfig(**dict(big, dynamic_smem=False)), shapes)
    sched = tmp_path / "s.yaml"
    sched.write_text(yaml.safe_dump({"paths": [{"name": "big", "max_rows_per_expert": None, "experts": big}]}))
    root = build(spec, "cuda-sm90", tmp_path, golden=False, schedules=sched)
    src = (root / "moe.cu").read_text()
    for fn in ("experts_up_big", "experts_down_big"):
        k = _kernel(src, fn)
        assert "extern __shared__" in k and "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16" in k, fn
        assert "cp.async" in k or "cp_async" in k, fn  # stages > 1: the pipelined copies
        assert f"cudaFuncSetAttribute(::{fn}_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize" in src, fn
    # TVM declares its cp.async helpers with int offsets: widened (build.widen_copy_offsets), or a
    # DeepSeek-V3 w13 (7.5e9 elements) wraps past 2**31
    helpers = [line for line in src.splitlines() if "__device__ void ptx_cp_async" in line]
    assert helpers and all("long long dst_off" in h and "long long src_off" in h for h in helpers), helpers


def test_tensor_intrinsics_tensorize_a_plain_matmul():
    """The registered bf16/fp16 intrinsics (moegen.schedule.tensor_intrin) match a 16x16x16 fp32-
    accumulating matmul: tensorize accepts it for both dtypes and refuses fp32 inputs by name."""
    import tvm
    from tvm import s_tir
    from tvm.script import tirx as T

    from moegen.schedule import tensor_intrin

    for dt in tensor_intrin.INPUT_DTYPES:
        names = tensor_intrin.names(dt)
        for n in names.values():
            assert s_tir.TensorIntrin.get(n, allow_missing=True) is not None, n

        @T.prim_func(s_tir=True)
        def mm(a: T.Buffer((16, 16), dt), b: T.Buffer((16, 16), dt), c: T.Buffer((16, 16), "float32")):
            for i, j, k in T.grid(16, 16, 16):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    with T.init():
                        c[vi, vj] = T.float32(0)
                    c[vi, vj] += T.Cast("float32", a[vi, vk]) * T.Cast("float32", b[vk, vj])

        sch = s_tir.Schedule(tvm.IRModule({"main": mm}))
        blk = sch.get_sblock("C")
        aw = sch.cache_read(blk, 0, "warp")
        bw = sch.cache_read(blk, 1, "warp")
        cw = sch.cache_write(blk, 0, "warp")
        sch.decompose_reduction(blk, sch.get_loops(blk)[0])
        for b_, which in ((aw, ("write", 0)), (bw, ("write", 0)), (cw, ("read", 0))):
            sch.transform_layout(b_, which, tensor_intrin.frag_layout_4d)
        sch.tensorize(sch.get_loops(blk)[0], names["compute"])
        assert "ptx_legacy.mma" in sch.mod.script() or "ptx_mma" in sch.mod.script()
    with pytest.raises(ValueError, match="float16 | bfloat16"):
        tensor_intrin.names("float32")


def test_sorted_paths_dispatch_over_tiles_and_raster_the_grid(artifact, tmp_path):
    """schedules/cuda-sm90.yaml: the sorted paths dispatch in three kernels over tiles of slots
    (dispatch_tile; no one-block dispatch left), and the prefill path's GEMMs raster their grid in groups
    of group_m sorted blocks: the sorted block is blockIdx.y * G + blockIdx.x % G, the weight tile
    blockIdx.x / G, and the num_blocks guard on that block comes before any shared-memory load. (The
    dispatch buffers are checked equal to dispatch_ref on a GPU: scripts/gpu_check.py.)"""
    root = artifact("tiny", "cuda-sm90")
    m = read_manifest(root)
    src = (root / "moe.cu").read_text()
    tiled = [p for p in m["paths"] if p["config"].get("dispatch_tile")]
    assert tiled and all(p["config"]["sort"] for p in tiled)
    for p in tiled:
        name = p["name"]
        assert f"dispatch_{name}" not in m["functions"]
        for part in ("count", "scan", "place"):
            assert f"dispatch_{part}_{name}" in m["functions"], part
        assert "tile_counts_ptr" in _kernel(src, f"dispatch_place_{name}")
    # tiny's I 96 takes no tensor-core tile; at I 128 its prefill path keeps one, rastered
    import dataclasses

    from moegen.build import build

    root = build(dataclasses.replace(load_spec(SPECS / "tiny.yaml"), intermediate_size=128), "cuda-sm90", tmp_path,
                 golden=False)
    m, src = read_manifest(root), (root / "moe.cu").read_text()
    grouped = [p for p in m["paths"] if p["config"].get("group_m", 1) > 1]
    assert grouped and all(p["config"]["mma"] for p in grouped)
    # cuda-sm90.yaml's prefill paths run on wgmma (tests/test_wgmma.py), which rasters in the kernel
    # itself (kernels/experts_wgmma.py); the same config without wgmma takes the mma.sync raster
    # (schedule.cuda._exit_past_blocks)
    assert all(p["config"]["wgmma"] for p in grouped)
    mma = build(dataclasses.replace(load_spec(SPECS / "tiny.yaml"), intermediate_size=128), "cuda-sm90",
                tmp_path / "mma", golden=False, schedules=_without_wgmma(tmp_path))
    for root in (root, mma):
        m, src = read_manifest(root), (root / "moe.cu").read_text()
        for p in (p for p in m["paths"] if p["config"].get("group_m", 1) > 1):
            g, first_load = p["config"]["group_m"], "cp_async" if p["config"]["wgmma"] else "ldmatrix"
            for fn in (f"experts_up_{p['name']}", f"experts_down_{p['name']}"):
                k = _kernel(src, fn)
                guard = k.index("num_blocks_ptr[0]")
                head = k[:guard]
                assert f"(((int64_t)blockIdx.y) * (int64_t){g}) + " in head and "blockIdx.x" in head, (fn, head)
                assert guard < k.index(first_load), fn
            # (the down GEMM's Hp 128 is one weight tile: there blockIdx.x < G is the block in its group)
            # (wgmma's kernel names blockIdx.x through an int cast: ((int64_t)((int)blockIdx.x)))
            k = _kernel(src, f"experts_up_{p['name']}")
            x = r"\(\(int64_t\)(?:\(\(int\))?blockIdx\.x\)?\)"
            assert re.search(x + rf" & \(int64_t\){g - 1}\)", k.split("num_blocks_ptr[0]")[0]), p["name"]
            assert re.search(x + rf" >> \(int64_t\){g.bit_length() - 1}", k), p["name"]  # the weight tile


MMA_SYNC_STAGES = 2


def _without_wgmma(tmp_path):
    """schedules/cuda-sm90.yaml with wgmma off on every path (the mma.sync fallback of the same tiles), at most
    MMA_SYNC_STAGES stages: wgmma's deeper rings do not fit beside the mma.sync tile's fp32 accumulator in
    shared memory, and fit_config refuses such a tile rather than run it on CUDA cores."""
    import yaml

    from moegen.schedule.config import SCHEDULES_DIR

    data = yaml.safe_load((SCHEDULES_DIR / "cuda-sm90.yaml").read_text())
    for p in data["paths"]:
        p["experts"]["wgmma"] = False
        p["experts"]["stages"] = min(p["experts"].get("stages", 1), MMA_SYNC_STAGES)
    out = tmp_path / "no-wgmma.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


def test_decode_path_loads_weights_16_bytes_at_a_time(artifact):
    """The shipped cuda-sm90 decode path (vector_loads): every thread of both expert kernels loads a
    16-byte vector of weight columns per k step; its blocks past num_blocks exit first too."""
    root = artifact("tiny", "cuda-sm90")
    decode = read_manifest(root)["paths"][0]
    assert decode["config"]["vector_loads"] and decode["config"]["block_m"] == 1
    src = (root / "moe.cu").read_text()
    for fn, w in ((f"experts_up_{decode['name']}", "w13_ptr"), (f"experts_down_{decode['name']}", "w2_ptr")):
        k = _kernel(src, fn)
        assert f"*(uint4*)({w} + " in k, fn
        assert k.index("num_blocks_ptr[0]") < k.index(f"*(uint4*)({w} + "), fn


def test_decode_unroll_loads_its_k_steps_to_registers_first(tmp_path):
    """decode_unroll 8: each decode thread copies 8 k steps of 16-byte weight vectors to registers, then
    sums them (the loads in flight together). Up: 256 / split_k 8 = 32 steps, 4 iterations of 8; down:
    96 / 8 = 12 steps, the unroll fitted to 6 (a divisor), 2 iterations."""
    import yaml

    from moegen.build import build
    from moegen.spec import parse_spec

    spec = parse_spec({"name": "unroll", "dtype": "bfloat16", "hidden_size": 256, "intermediate_size": 96,
                       "num_experts": 8, "top_k": 2})
    cfg = {"block_m": 1, "block_n_up": 64, "block_n_down": 64, "combine_n": 128, "gather_rows": False,
           "grid_blocks": True, "split_k": 8, "vector_loads": True, "sort": False, "dispatch_threads": 256,
           "y_model_dtype": True, "decode_unroll": 8}
    sched = tmp_path / "s.yaml"
    sched.write_text(yaml.safe_dump({"paths": [{"name": "d", "max_rows_per_expert": None, "experts": cfg}]}))
    src = (build(spec, "cuda-sm90", tmp_path, golden=False, schedules=sched) / "moe.cu").read_text()
    for fn, w, steps, unroll in (("experts_up_d", "w13", 32, 8), ("experts_down_d", "w2", 12, 6)):
        k = _kernel(src, fn)
        assert f"nv_bfloat16 {w}_local_ptr[{unroll * 8}];" in k, fn  # unroll x 8 elements in registers
        loads = re.findall(rf"\*\(uint4\*\)\({w}_local_ptr \+ \(int64_t\)(\d+)\) = \*\(uint4\*\)\({w}_ptr \+ ", k)
        assert sorted(int(o) for o in loads) == [8 * i for i in range(unroll)], (fn, loads)
        assert f"< (int64_t){steps // unroll}; ++" in k, fn
        # every load of an iteration comes before its first sum
        body = k[k.index(f"{w}_local_ptr + (int64_t)0) ="):]
        assert body.index(f"{w}_local_ptr + (int64_t){8 * (unroll - 1)}) =") < body.index("gu_rf" if w == "w13" else "ysum_rf"), fn


def test_decode_prefetch_issues_the_next_batch_before_the_sums(tmp_path):
    """decode_prefetch both on the spec above: each GEMV keeps two batches of weights in registers (the
    buffer doubles); the second batch's loads come before the first batch's sums, and in the down GEMV
    before its grid wait too, while its act loads stay below the wait in the machine code (coherent reads)."""
    import yaml

    from moegen.build import build
    from moegen.spec import parse_spec

    spec = parse_spec({"name": "prefetch", "dtype": "bfloat16", "hidden_size": 256, "intermediate_size": 96,
                       "num_experts": 8, "top_k": 2})
    cfg = {"block_m": 1, "block_n_up": 64, "block_n_down": 64, "combine_n": 128, "gather_rows": False,
           "grid_blocks": True, "split_k": 8, "vector_loads": True, "sort": False, "dispatch_threads": 256,
           "y_model_dtype": True, "decode_unroll": 8, "decode_prefetch": "both"}
    sched = tmp_path / "s.yaml"
    sched.write_text(yaml.safe_dump({"paths": [{"name": "d", "max_rows_per_expert": None, "experts": cfg}]}))
    root = build(spec, "cuda-sm90", tmp_path, golden=False, schedules=sched)
    src = (root / "moe.cu").read_text()
    for fn, w, unroll in (("experts_up_d", "w13", 8), ("experts_down_d", "w2", 6)):
        k = _kernel(src, fn)
        assert f"nv_bfloat16 {w}_local_ptr[{2 * unroll * 8}];" in k, fn  # two batches of unroll x 8 elements
        first_sum = k.index("gu_rf" if w == "w13" else "ysum_rf", k.index(f"{w}_local_ptr + (int64_t)0) ="))
        second = k.index(f"{w}_local_ptr + (int64_t){8 * unroll}) = ")
        assert second < first_sum, fn
    down = _kernel(src, "experts_down_d")
    assert down.index(f"w2_local_ptr + (int64_t){8 * (2 * 6 - 1)}) = ") < down.index("moegen_grid_wait();") < down.index("act_ptr[")
    sass = _sass(root / "moe.so")["experts_down_d_kernel"]
    before = GLOBAL_LOAD.findall(sass[:sass.index("ACQBULK")])
    # more than one batch of weights in flight at the wait (ptxas may sink a few below it), nothing of act
    assert before.count("LDG.E.128.CONSTANT") > 6 and set(before) <= {"LDG.E.128.CONSTANT", "LDG.E"}, before
    assert before.count("LDG.E") <= 2, before
    # without it: one buffer
    cfg["decode_prefetch"] = "none"
    sched.write_text(yaml.safe_dump({"paths": [{"name": "d", "max_rows_per_expert": None, "experts": cfg}]}))
    src = (build(spec, "cuda-sm90", tmp_path / "none", golden=False, schedules=sched) / "moe.cu").read_text()
    assert "nv_bfloat16 w13_local_ptr[64];" in _kernel(src, "experts_up_d")


def test_decode_unroll_limits():
    """config_ok: decode_unroll 1-16, and 16 bytes of registers per unrolled step for every thread of the
    block must fit the multiprocessor's registers; the CPU and tensor-core paths ignore it."""
    from moegen.kernels.experts import ExpertShapes
    from moegen.schedule.config import ExpertsConfig, config_ok

    sh = ExpertShapes("bfloat16", 128, 8, 2048, 768, "silu", 1.702, 7.0, False, False)
    dec = dict(block_m=1, block_n_up=128, block_n_down=128, combine_n=128, grid_blocks=True, sort=False,
               vector_loads=True)
    assert config_ok(ExpertsConfig(**dec, split_k=64, decode_unroll=8), sh) is None  # 1024 threads x 56
    assert "pass the 65536 registers" in config_ok(ExpertsConfig(**dec, split_k=64, decode_unroll=16), sh)
    assert config_ok(ExpertsConfig(**dec, split_k=32, decode_unroll=16), sh) is None  # 512 threads
    assert "decode_unroll 0 must be 1 to 16" in config_ok(ExpertsConfig(**dec, split_k=32, decode_unroll=0), sh)
    assert "decode_unroll 32 must be 1 to 16" in config_ok(ExpertsConfig(**dec, split_k=32, decode_unroll=32), sh)
    # decode_prefetch: a second buffer of registers for the GEMVs it names
    assert config_ok(ExpertsConfig(**dec, split_k=32, decode_unroll=8, decode_prefetch="both"), sh) is None
    assert "2 x decode_unroll 8" in config_ok(ExpertsConfig(**dec, split_k=64, decode_unroll=8, decode_prefetch="up"), sh)
    assert config_ok(ExpertsConfig(**dec, split_k=64, decode_unroll=8, decode_prefetch="none"), sh) is None
    assert "decode_prefetch 'some': allowed none | up | down | both" in config_ok(
        ExpertsConfig(**dec, split_k=32, decode_unroll=8, decode_prefetch="some"), sh)


def test_sharded_spec_builds_for_cuda(tmp_path):
    """A TP-2 shard with narrow widths (I 32 per rank) builds every CUDA path: the vector decode fits
    its split-K so each thread keeps at least two k steps (found by `make gpu-bundle`)."""
    from pathlib import Path

    from moegen.build import build

    spec = load_spec(Path(__file__).resolve().parents[1] / "scripts/specs/ds-small-sp-tp2.yaml")
    decode = read_manifest(build(spec, "cuda-sm90", tmp_path, golden=False))["paths"][0]["config"]
    assert decode["vector_loads"] and decode["split_k"] == 16


def test_cuda_artifact_packs_weights_with_16_byte_kernels(artifact):
    """schedules/cuda-sm90.yaml has a `pack:` section: the artifact lists one pack_w13_n{BN} and one
    pack_w2_n{BN} per packed layout its paths read (one for every CUDA path here), with the weight and
    packed shapes, and its CUDA source holds their kernels: 16-byte loads of the weight, 16-byte
    stores of the packed tiles, no shared memory (the V x V transpose stays in registers).
    (The runner's packed weights are compared with runtime/packing.py on the H100: scripts/gpu_check.py.)"""
    root = artifact("tiny", "cuda-sm90")
    m = read_manifest(root)
    spec = load_spec(SPECS / "tiny.yaml")
    ups = {p["config"]["block_n_up"] for p in m["paths"]}
    downs = {p["config"]["block_n_down"] for p in m["paths"]}
    assert len(ups) == len(downs) == 1
    (up,), (down,) = ups, downs
    assert sorted(f for f in m["functions"] if f.startswith("pack_")) == [f"pack_w13_n{up}", f"pack_w2_n{down}"]
    E, H, I = spec.num_experts, spec.hidden_size, spec.intermediate_size
    assert m["functions"][f"pack_w13_n{up}"] == [
        {"name": "w13", "shape": [str(E), str(2 * I), str(H)], "dtype": "bfloat16"},
        {"name": "out", "shape": [str(E), str(2 * I // up), str(H), str(up)], "dtype": "bfloat16"}]
    assert m["functions"][f"pack_w2_n{down}"] == [
        {"name": "w2", "shape": [str(E), str(H), str(I)], "dtype": "bfloat16"},
        {"name": "out", "shape": [str(E), str(H // down), str(I), str(down)], "dtype": "bfloat16"}]
    src = (root / "moe.cu").read_text()
    for fn, w in ((f"pack_w13_n{up}", "w13_ptr"), (f"pack_w2_n{down}", "w2_ptr")):
        k = _kernel(src, fn)
        assert k.count(f"= *(uint4*)({w} + ") == 8, fn  # V = 8 bf16: 8 source rows of 8 k per thread
        assert k.count("*(uint4*)(out_ptr + ") == 8, fn  # and 8 output rows of 8 columns
        assert "__shared__" not in k and "__syncthreads" not in k, fn


def test_config_ok_names_the_dispatch_tile_and_group_m_limits():
    """dispatch_tile needs dispatch_threads a power of two that divides it; group_m only rasters
    tensor-core tiles."""
    from moegen.build import expert_shapes
    from moegen.schedule.config import ExpertsConfig, config_ok

    shapes = expert_shapes(load_spec(SPECS / "tiny.yaml"))
    base = dict(block_m=16, block_n_up=64, block_n_down=128, combine_n=128, gather_rows=False, grid_blocks=True,
                dispatch_threads=256, mma=True, block_k=32, warp_m=16, warp_n=32)
    assert config_ok(ExpertsConfig(**base, dispatch_tile=1024, group_m=4), shapes) is None
    for bad, why in ((dict(dispatch_tile=1000), "dispatch_tile 1000"),
                     (dict(dispatch_tile=1024, dispatch_threads=96), "not 96"),
                     (dict(group_m=0), "group_m 0 < 1"),
                     (dict(group_m=4, mma=False), "group_m 4 needs mma")):
        assert why in config_ok(ExpertsConfig(**dict(base, **bad)), shapes), bad


def test_combine_sums_vectors_of_adjacent_columns(artifact):
    """cuda-sm90's schedules ask for combine_vector 8 past the decode path: each combine thread loads 8
    adjacent columns of a row at once (16 bytes of a 16-bit y, 32 of fp32) and stores 8 outputs at once;
    K-sums in fp32. The decode path keeps a column per thread (measured faster at one token)."""
    from moegen.build import expert_shapes
    from moegen.schedule.config import ExpertsConfig, config_ok, fit_config

    root = artifact("tiny", "cuda-sm90")
    m = read_manifest(root)
    src = (root / "moe.cu").read_text()
    assert [p["config"]["combine_vector"] for p in m["paths"]] == [1] + [8] * (len(m["paths"]) - 1)
    for p in m["paths"]:
        c = p["config"]
        k = _kernel(src, f"combine_{p['name']}")
        if c["combine_vector"] == 1:
            assert "y_local_ptr" not in k and "uint4" not in k, p["name"]
            continue
        vec = "uint4" if c.get("y_model_dtype") else "ulonglong4"
        assert f"*({vec}*)(y_local_ptr + 0) = *({vec}*)(y_ptr + " in k, p["name"]
        assert "*(uint4*)(out_ptr + " in k and "float osum_local_ptr[8]" in k.replace("alignas(64) ", ""), p["name"]
        assert f"__launch_bounds__({c['combine_n'] // 8}) combine_{p['name']}_kernel(" in src
    shapes = expert_shapes(load_spec(SPECS / "tiny.yaml"))
    cfg = ExpertsConfig(**{**m["paths"][0]["config"], "combine_n": 64, "combine_vector": 48})
    assert "combine_vector 48 does not divide combine_n 64" in config_ok(cfg, shapes)
    fitted = fit_config(cfg, shapes)  # the largest power of two up to 48 that divides combine_n
    assert (fitted.combine_n, fitted.combine_vector) == (64, 32) and config_ok(fitted, shapes) is None


@pytest.mark.parametrize("target", ["cuda-sm90", "cuda-sm80"])
def test_kernels_launch_programmatically_on_hopper_only(target, artifact):
    """cuda-sm90 (programmatic_launch): every kernel's first statement waits for the grid before it, the
    decode path's kernels then let the next one launch (and no other kernel does), and the launch helper
    sets the programmatic-serialization attribute on every launch. sm_80 has no griddepcontrol: its
    source has neither."""
    from moegen.build import early_trigger

    root = artifact("tiny", target)
    src = (root / "moe.cu").read_text()
    entries = re.findall(r'^extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)_kernel\([^;]*\{\n(.*)\n(.*)$',
                         src, re.M)
    assert len(entries) >= 8  # routing, the dispatches, the GEMMs, combine of several paths
    m = read_manifest(root)
    early = early_trigger(m["paths"])
    if hopper := target == "cuda-sm90":  # the shipped t1 path is the vector decode
        assert {"route_dispatch_t1", "experts_up_t1", "experts_down_t1", "combine_t1"} <= early
    inside = {"experts_down_t1"}  # the decode down GEMV waits after its first weights (its own call)
    for name, first, second in entries:
        assert ("griddepcontrol.wait;" in first) == (hopper and name not in inside), name
        trigger = first if name in inside else second
        assert ("griddepcontrol.launch_dependents;" in trigger) == (hopper and name in early), name
    wait = ' asm volatile("griddepcontrol.wait;" ::: "memory"); ' if hopper else ""
    assert src.startswith(f"__device__ __forceinline__ void moegen_grid_wait() {{{wait}}}")
    for name in inside if hopper else ():  # between the first batch's weight loads and the first read of act
        k = _kernel(src, name)
        assert k.count("moegen_grid_wait();") == 1
        assert k.index("*(uint4*)(w2_ptr + ") < k.index("moegen_grid_wait();") < k.index("act_ptr[")
    assert not hopper or early <= {name for name, _, _ in entries}  # the decode path's kernels are there
    assert src.count("programmaticStreamSerializationAllowed = 1") == (1 if hopper else 0)
    # the manifest says how the kernels launch
    assert m["compiled"].get("programmatic_launch") == ({"early_trigger": sorted(early)} if hopper else None)
    assert "griddepcontrol" not in src or hopper


def _sass(library) -> dict[str, str]:
    """{kernel name: its SASS} of a CUDA library, by the cuobjdump (and the nvdisasm it calls) of the dev extra."""
    import os
    import subprocess
    from pathlib import Path

    import nvidia

    tools = Path(next(iter(nvidia.__path__))) / "cu13" / "bin"
    out = subprocess.run([str(tools / "cuobjdump"), "-sass", str(library)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PATH": f"{tools}:{os.environ.get('PATH', '')}"}).stdout
    return {m.group(1): m.group(2) for m in re.finditer(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", out, re.S)}


GLOBAL_LOAD = re.compile(r"\b(LDGSTS[A-Z0-9.]*|LDG\.[A-Z0-9.]+|LD\.[A-Z0-9.]+)")


def test_no_kernel_reads_the_forwards_buffers_above_its_grid_wait(artifact):
    """cuda-sm90 (programmatic launch): in the machine code of every kernel, no global load or cp.async issues
    before its griddepcontrol.wait (SASS ACQBULK), but the decode down GEMV's, placed there on purpose
    (schedule.cuda._wait_after_first_weights): its first batch of 16-byte weight loads (non-coherent: the
    weights never change) and coherent loads of its block's expert and num_blocks. While every buffer was
    __restrict__, ptxas issued the sorted GEMMs' non-coherent read of num_blocks above the wait (session 11);
    build.coherent_chain_reads keeps __restrict__ on the weights and x only, so such reads stay below it."""
    from moegen.build import RESTRICT_PARAMS

    root = artifact("tiny", "cuda-sm90")
    m = read_manifest(root)
    decode_down = {f"experts_down_{p['name']}_kernel" for p in m["paths"] if p["config"].get("vector_loads")}
    sass = _sass(root / m["library"])
    assert decode_down and decode_down <= set(sass) and len(sass) >= 20
    for name, code in sass.items():
        assert code.count("ACQBULK") == 1, name  # every kernel waits once
        before = GLOBAL_LOAD.findall(code[:code.index("ACQBULK")])
        if name in decode_down:
            assert "LDG.E.128.CONSTANT" in before, (name, before)
            assert set(before) <= {"LDG.E.128.CONSTANT", "LDG.E"} and before.count("LDG.E") <= 2, (name, before)
        else:
            assert before == [], (name, before)
    # the source: a kernel's __restrict__ parameters are the weights, x and what it stores to (sm_80, without
    # programmatic launch, keeps every one)
    for target, hopper in (("cuda-sm90", True), ("cuda-sm80", False)):
        root = artifact("tiny", target)
        src, decode = (root / "moe.cu").read_text(), read_manifest(root)["paths"][0]["name"]
        for fn, kept, dropped in (("experts_up", {"w13_ptr", "x_ptr", "act_ptr"}, {"sorted_ids_ptr", "block_expert_ptr"}),
                                  ("experts_down", {"w2_ptr", "y_ptr"}, {"act_ptr", "topk_weights_ptr"}),
                                  ("combine", {"out_ptr"}, {"y_ptr", "slot_pos_ptr"})):
            restricted = set(re.findall(r"__restrict__ (\w+)", _kernel(src, f"{fn}_{decode}").split("{")[0]))
            assert kept <= restricted and (not dropped & restricted) == hopper, (target, fn, restricted)


def test_coherent_chain_reads_keeps_restrict_on_weights_x_and_outputs():
    """Declarations follow their kernel's definition; a kernel keeps __restrict__ on what it stores to (both
    store shapes of TVM's codegen), braces in inline-asm strings do not end its body; host code is left alone."""
    from moegen.build import coherent_chain_reads

    sig = ('extern "C" __global__ void __launch_bounds__(64) k_kernel(float* __restrict__ act_ptr, float* __restrict__ '
           'w2_ptr, int* __restrict__ num_blocks_ptr, float* __restrict__ x_ptr, float* __restrict__ y_ptr, '
           'float* __restrict__ out_ptr)')
    src = (sig + ';\n' + sig + ' {\n  asm volatile("{\\n}\\n" ::: "memory");\n'
           '  if (num_blocks_ptr[0] > 0) {\n    y_ptr[0] = act_ptr[num_blocks_ptr[0]];\n  }\n'
           '  *(uint4*)(out_ptr + 8) = *(uint4*)(x_ptr + 8);\n}\n'
           'int host(float* __restrict__ act_ptr) {\n  act_ptr[0] = 1;\n}\n')
    out = coherent_chain_reads(src)
    kept = ('(float* act_ptr, float* __restrict__ w2_ptr, int* num_blocks_ptr, float* __restrict__ x_ptr, '
            'float* __restrict__ y_ptr, float* __restrict__ out_ptr)')
    assert out.count(kept) == 2, out  # the declaration and the definition
    assert "int host(float* __restrict__ act_ptr) {" in out


def test_programmatic_launch_refuses_a_changed_source():
    """The rewrite names TVM's source shape it relies on, instead of shipping kernels without the wait."""
    from moegen.build import add_programmatic_launch

    with pytest.raises(RuntimeError, match="TVM's CUDA source changed shape"):
        add_programmatic_launch('extern "C" __global__ void k(float* a) {\n  a[0] = 1;\n}\n')


def test_programmatic_launch_names_split_kernels_by_their_function():
    """A function TVM lowers to several kernels (f_kernel, f_kernel_1) or one without launch bounds gets the
    wait in each; the early trigger follows the function's name, not the kernel's."""
    from moegen.build import _LAUNCH_HELPER, add_programmatic_launch

    src = ('extern "C" __global__ void __launch_bounds__(64) combine_t1_kernel(float* a) {\n  a[0] = 1;\n}\n'
           'extern "C" __global__ void combine_t1_kernel_1(float* a) {\n  a[1] = 1;\n}\n'
           'extern "C" __global__ void routing_kernel(float* a) {\n  a[2] = 1;\n}\n' + _LAUNCH_HELPER)
    out = add_programmatic_launch(src, frozenset({"combine_t1"}))
    bodies = out.split('extern "C" __global__ void ')[1:]
    assert all("griddepcontrol.wait;" in b.splitlines()[1] for b in bodies)
    assert ["launch_dependents" in b for b in bodies] == [True, True, False]
    assert "programmaticStreamSerializationAllowed = 1" in out and _LAUNCH_HELPER not in out


def test_programmatic_launch_leaves_the_wait_to_kernels_that_call_it():
    """A kernel that calls moegen_grid_wait() in its body (the decode down GEMV) gets no wait at entry,
    still its early trigger; the kernel after it is unaffected."""
    from moegen.build import _LAUNCH_HELPER, add_programmatic_launch

    src = ('extern "C" __global__ void experts_down_t1_kernel(float* a) {\n  a[0] = 1;\n  moegen_grid_wait();\n'
           '  a[1] = a[2];\n}\n'
           'extern "C" __global__ void combine_t1_kernel(float* a) {\n  a[2] = 1;\n}\n' + _LAUNCH_HELPER)
    down, combine = add_programmatic_launch(src, frozenset({"experts_down_t1"})).split('extern "C" __global__ void ')[1:]
    assert "griddepcontrol.wait;" not in down and down.splitlines()[1].endswith('"griddepcontrol.launch_dependents;" ::: "memory");')
    assert "griddepcontrol.wait;" in combine.splitlines()[1] and "launch_dependents" not in combine


def _fused_build(tmp_path, target, **extra):
    """The unroll spec above with one decode path, fused (kernels/experts_fused.py)."""
    import yaml

    from moegen.build import build
    from moegen.spec import parse_spec

    spec = parse_spec({"name": "fused", "dtype": "bfloat16", "hidden_size": 256, "intermediate_size": 96,
                       "num_experts": 8, "top_k": 2})
    cfg = {"block_m": 1, "block_n_up": 64, "block_n_down": 64, "combine_n": 128, "gather_rows": False,
           "grid_blocks": True, "split_k": 8, "vector_loads": True, "sort": False, "dispatch_threads": 256,
           "y_model_dtype": True, "decode_unroll": 8, "fused": True, **extra}
    tmp_path.mkdir(parents=True, exist_ok=True)
    sched = tmp_path / "s.yaml"
    sched.write_text(yaml.safe_dump({"paths": [{"name": "d", "max_rows_per_expert": None, "experts": cfg}]}))
    root = build(spec, target, tmp_path / target, golden=False, schedules=sched)
    return read_manifest(root), (root / "moe.cu").read_text()


@pytest.mark.parametrize("target", ["cuda-sm90", "cuda-sm80"])
def test_fused_decode_is_one_kernel_from_x_to_the_output(target, tmp_path):
    """config.fused: route_dispatch, then one kernel (no experts_up / experts_down / combine): 16-byte weight
    loads of w13 and w2, the slot sums added into the fp32 acc with red.global.add.v4.f32 on sm_90
    (targets/cuda-sm90.yaml vector_red) or scalar atomicAdd on sm_80, a block counter, and the last block
    reading acc through L2 (__ldcg) and zeroing it. Its first w13 batch is asked for before x is staged and its
    first w2 batch before the up GEMV's partial sums meet (the loads fly while the block synchronises)."""
    m, src = _fused_build(tmp_path, target)
    fns = set(m["functions"])
    assert {"route_dispatch_d", "experts_fused_d"} <= fns
    assert not {"experts_up_d", "experts_down_d", "combine_d", "dispatch_d"} & fns
    k = _kernel(src, "experts_fused_d")
    assert "*(uint4*)(w13_ptr + " in k and "*(uint4*)(w2_ptr + " in k
    if target == "cuda-sm90":
        assert "red_vec_f32_global_add_v4_f32((&(acc_ptr[" in k and "atomicAdd((&(acc_ptr[" not in k
    else:
        assert "atomicAdd((&(acc_ptr[" in k and "red_vec" not in k
    assert "atomicAdd((&(count_ptr[0])), 1)" in k and "count_ptr[0] = 0;" in k
    last = k[k.index("__ldcg(") - 200:]  # the last block's loop: acc read through L2, then zeroed
    assert re.search(r"acc_ptr\[[^\]]*\] = 0x0p\+0f", last)
    def store(buf):  # the first store to a shared buffer (past its declaration)
        return re.search(rf"\n\s*{buf}\[[^;]*\] = ", k).start()

    assert k.index("*(uint4*)(w13_ptr + ") < store("xs_ptr")  # weights asked for before x is staged
    assert k.index("*(uint4*)(w2_ptr + ") < store("red_ptr")  # down weights before the up sums meet
    # acc and count are zero between forwards: the runner allocates them zeroed, the kernel leaves them so
    assert m["paths"][0]["config"]["fused"] is True
    if target == "cuda-sm90":  # both kernels of the path let the next launch early (build.early_trigger)
        assert m["compiled"]["programmatic_launch"]["early_trigger"] == ["experts_fused_d", "route_dispatch_d"]


def test_fused_interleave_reads_contiguous_rows_per_batch(tmp_path):
    """decode_interleave: up thread (ks, cg) reads rows ks, ks + split_k, ... so one batch of the block's
    loads is split_k contiguous rows (thread tx at element tx * 8 of the tile); without it thread ks starts at
    row ks * Hx / split_k."""
    _, plain = _fused_build(tmp_path / "p", "cuda-sm90")
    _, inter = _fused_build(tmp_path / "i", "cuda-sm90", decode_interleave=True)
    first = re.compile(r"\*\(uint4\*\)\(wv_ptr \+ 0\) = \*\(uint4\*\)\(w13_ptr \+ ([^;]*)\);")
    p, i = (first.search(_kernel(s, "experts_fused_d")).group(1) for s in (plain, inter))
    assert "(((int64_t)((int)threadIdx.x)) * (int64_t)8)" in i and "threadIdx.x)) >> (int64_t)3) * (int64_t)2048)" in p


def test_fused_config_limits():
    """config_ok: fused needs the decode path (vector_loads, no sort); decode_interleave needs fused; the
    fused kernel's tile must divide the layer. fit_config keeps fused with its unroll fitted, or drops it (and
    the interleave) where the widths do not allow; weight on input takes fused (its x * w staged in shared
    memory). target_ok: fused is CUDA only; a CUDA-core split-K tile past 1024 threads is refused."""
    from types import SimpleNamespace

    from moegen.kernels.experts import ExpertShapes
    from moegen.schedule.config import ExpertsConfig, config_ok, fit_config, target_ok

    sh = ExpertShapes("bfloat16", 128, 8, 2048, 768, "silu", 1.702, 7.0, False, False)
    dec = dict(block_m=1, block_n_up=128, block_n_down=128, combine_n=128, grid_blocks=True, split_k=32,
               decode_unroll=8)
    ok = ExpertsConfig(**dec, sort=False, vector_loads=True, fused=True, decode_interleave=True)
    assert config_ok(ok, sh) is None
    assert "fused needs vector_loads true and sort false" in config_ok(ExpertsConfig(**dec, sort=False, fused=True), sh)
    assert "fused needs vector_loads true and sort false" in config_ok(
        ExpertsConfig(**dec, vector_loads=True, fused=True), sh)
    assert "fused_routing needs fused true" in config_ok(
        ExpertsConfig(**dec, sort=False, vector_loads=True, fused_routing=True), sh)
    assert "decode_interleave needs fused true" in config_ok(
        ExpertsConfig(**dec, sort=False, vector_loads=True, decode_interleave=True), sh)
    odd = ExpertShapes("bfloat16", 8, 2, 264, 96, "silu", 1.702, 7.0, False, False)  # Hx 264 = 8 x 33
    fitted = fit_config(ok, odd)
    assert fitted.fused and fitted.decode_interleave and 264 % (fitted.split_k * fitted.decode_unroll) == 0
    no_vectors = fit_config(ok, ExpertShapes("bfloat16", 8, 2, 264, 100, "silu", 1.702, 7.0, False, False))
    assert not (no_vectors.vector_loads or no_vectors.fused or no_vectors.decode_interleave)  # tiles of 100 columns
    woi = ExpertShapes("bfloat16", 8, 1, 256, 96, "relu2", 1.702, 7.0, True, True)
    assert fit_config(ExpertsConfig(**dec, sort=False, vector_loads=True), woi).fused
    cpu, cuda = SimpleNamespace(name="cpu-x", family="cpu", extra={}), SimpleNamespace(name="cuda-x", family="cuda", extra={})
    assert "fused: true needs a CUDA target" in target_ok(ok, cpu) and target_ok(ok, cuda) is None
    big = ExpertsConfig(block_m=1, block_n_up=128, block_n_down=128, combine_n=128, split_k=64)
    assert "8192 threads a block" in target_ok(big, cuda) and target_ok(big, cpu) is None


@pytest.mark.parametrize("target", ["cuda-sm90", "cuda-sm80"])
def test_top_k_1_weight_on_input_builds_for_cuda(target, tmp_path):
    """A Llama-4 style layer (top_k 1, weight on input: scripts/specs/woi-relu2-small.yaml) builds for CUDA:
    its combine of one slot keeps a K loop to vectorize, its tensor-core fills of x * w go 4 wide, its 16-byte
    decode path (sm_90's) is fused (until session 13 nvcc refused an fp32 x 8 broadcast, and the combine's
    schedule failed); sm_80's decode path (schedules/cuda.yaml) loads no vectors and stays unfused."""
    from moegen.build import build

    root = build(load_spec("scripts/specs/woi-relu2-small.yaml"), target, tmp_path, golden=False)
    decode = read_manifest(root)["paths"][0]
    assert decode["config"]["fused"] == decode["config"]["vector_loads"] == (target == "cuda-sm90")


def test_fused_routing_routes_in_the_kernel(tmp_path):
    """fused_routing: no route_dispatch; the fused kernel takes the logits, bias and expert map and ranks the
    experts itself (routing._rank_route), S threads per expert whose counts meet by warp shuffles (tiny: 8
    experts, 32 rank threads, a 64-thread block: S = 2). A block too small for a thread per expert is refused
    with one line."""
    import yaml

    from moegen.build import build
    from moegen.schedule.config import ScheduleError
    from moegen.spec import parse_spec

    m, src = _fused_build(tmp_path, "cuda-sm90", fused_routing=True)
    assert "experts_fused_d" in m["functions"] and not any(f.startswith("route") for f in m["functions"])
    args = [a["name"] if isinstance(a, dict) and "name" in a else a for a in m["functions"]["experts_fused_d"]]
    assert len(args) == 11  # x, logits, bias, expert_map, w13, b13, w2, b2, acc, count, out
    k = _kernel(src, "experts_fused_d")
    assert "logits_ptr" in k.split("{")[0] and "expert_map_ptr[" in k
    assert "__shfl_xor_sync((uint)4294967295, rk_ptr[0]" in k
    assert m["compiled"]["programmatic_launch"]["early_trigger"] == ["experts_fused_d"]
    spec = parse_spec({"name": "wide", "dtype": "bfloat16", "hidden_size": 256, "intermediate_size": 96,
                       "num_experts": 256, "top_k": 2})
    cfg = {"block_m": 1, "block_n_up": 64, "block_n_down": 64, "combine_n": 128, "grid_blocks": True, "split_k": 8,
           "vector_loads": True, "sort": False, "decode_unroll": 8, "fused": True, "fused_routing": True}
    sched = tmp_path / "w.yaml"
    sched.write_text(yaml.safe_dump({"paths": [{"name": "d", "max_rows_per_expert": None, "experts": cfg}]}))
    with pytest.raises(ScheduleError, match="schedules file w.yaml: .*fused_routing: 256 experts need 256 threads, the block has 64"):
        build(spec, "cuda-sm90", tmp_path / "w", golden=False, schedules=sched)
