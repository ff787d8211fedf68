"""The GPU bench's CPU-checkable parts (no GPU, no triton here): the floor arithmetic, the report (JSON,
table, PNG plot), the torch contenders and the Triton baseline's block alignment against the project's
references, and the one-line refusal of `moegen bench --target cuda-sm90` on a box without a GPU.

Shape legend: T tokens, K top-k, E experts, H hidden, I intermediate, N13 = 2I (gated) | I, S = T*K,
BM rows per block of the sorted order.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from conftest import NO_TVM_PRELUDE
from moegen import bench_cuda
from moegen.artifact import TOLERANCES
from moegen.baselines import torch_moe
from moegen.baselines.triton_moe import (CONFIG_BUCKETS, align_block_size, candidate_configs, config_bucket,
                                         fused_experts_emulated, padded_rows)
from moegen.bench import rel_err
from moegen.cli import main
from moegen.reference import dispatch_ref, moe_ref, random_weights
from moegen.spec import spec_from_dict

TOL = TOLERANCES["bfloat16"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Small layers with every option the contenders handle: gated silu, swigluoai + expert biases, grouped
# sigmoid routing with correction bias and a shared expert, relu2 (not gated) with the weight on the input.
SPECS = {
    "silu": dict(name="silu", dtype="bfloat16", hidden_size=48, intermediate_size=40, num_experts=6, top_k=2),
    "swigluoai-bias": dict(name="oai", dtype="bfloat16", hidden_size=40, intermediate_size=24, num_experts=8,
                           top_k=3, activation="swigluoai", expert_bias=True),
    "grouped-shared": dict(name="ds", dtype="bfloat16", hidden_size=64, intermediate_size=32, num_experts=16,
                           top_k=4, router=dict(scoring="sigmoid", num_expert_group=4, topk_group=2,
                                                correction_bias=True, routed_scaling_factor=2.5),
                           shared_experts=dict(intermediate_size=24)),
    "relu2-weight-on-input": dict(name="r2", dtype="bfloat16", hidden_size=32, intermediate_size=16,
                                  num_experts=5, top_k=1, activation="relu2",
                                  router=dict(apply_weight_on_input=True)),
}
TOKENS = (1, 7, 33)  # irregular: one token, fewer slots than experts, a count no block size divides


# ---- the floor ---------------------------------------------------------------------------------


def test_floor_by_hand():
    """E=4 experts, K=2, H=8, I=4 (silu: N13 = 8), bf16; tokens 0 and 1 pick experts {0, 1} and {1, 2}."""
    spec = spec_from_dict(dict(name="f", dtype="bfloat16", hidden_size=8, intermediate_size=4, num_experts=4, top_k=2))
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    per_expert = (8 * 8 + 8 * 4) * 2  # w13 [N13, H] + w2 [H, I] in bf16 = 192 bytes
    activations = 2 * 8 * 2 + 2 * 4 * 4 + 2 * 8 * 2  # x [T, H] bf16 + logits [T, E] fp32 + out [T, H] bf16 = 96
    nbytes = 3 * per_expert + activations  # 3 distinct experts: 672
    flops = 2 * 2 * 2 * (8 * 8 + 8 * 4)  # 2 T K (N13 H + H I) = 768
    ceilings = {"copy_bytes_per_s": 672e6, "gemm_flops_per_s": 384e6}  # bytes take 1 µs, FLOPs 2 µs
    f = bench_cuda.cell_floor(spec, ids, ceilings)
    assert (f["bytes"], f["flops"], f["experts_touched"]) == (nbytes, flops, 3)
    assert f["floor_us"] == pytest.approx(2.0) and f["bound"] == "compute"
    assert f["intensity"] == pytest.approx(768 / 672)
    f = bench_cuda.cell_floor(spec, ids, {"copy_bytes_per_s": 336e6, "gemm_flops_per_s": 768e6})
    assert f["floor_us"] == pytest.approx(2.0) and f["bound"] == "bandwidth"


def test_floor_counts_biases_and_shared_experts():
    """As above with expert biases and a shared expert of Is = 4 (dense: always read, always computed)."""
    spec = spec_from_dict(dict(name="f", dtype="bfloat16", hidden_size=8, intermediate_size=4, num_experts=4,
                               top_k=2, expert_bias=True, shared_experts=dict(intermediate_size=4)))
    ids = torch.tensor([[0, 1], [1, 2]], dtype=torch.int32)
    per_expert = (8 * 8 + 8 * 4 + 8 + 8) * 2  # + w13_bias [N13] + w2_bias [H]: 224
    shared = (8 * 8 + 8 * 4) * 2  # shared_w13 [2 Is, H] + shared_w2 [H, Is]: 192
    activations = 2 * 8 * 2 + 2 * 4 * 4 + 2 * (8 + 8) * 2  # out is shared [T, H] and routed [T, H]: 128
    flops = 2 * 2 * 2 * (8 * 8 + 8 * 4) + 2 * 2 * (8 * 8 + 8 * 4)  # routed + 2 T (2 Is H + H Is)
    f = bench_cuda.cell_floor(spec, ids, {"copy_bytes_per_s": 1e9, "gemm_flops_per_s": 1e12})
    assert (f["bytes"], f["flops"]) == (3 * per_expert + shared + activations, flops)


def test_expected_experts():
    assert bench_cuda.expected_experts(8, 2, 1) == pytest.approx(2)
    assert bench_cuda.expected_experts(8, 2, 0) == 0
    assert bench_cuda.expected_experts(128, 8, 2) == pytest.approx(128 * (1 - (120 / 128) ** 2))
    assert bench_cuda.expected_experts(256, 8, 4096) == pytest.approx(256)


# ---- the report --------------------------------------------------------------------------------


def synthetic_report() -> dict:
    cells = []
    for shape, E in (("mixtral-8x7b", 8), ("qwen3-30b-a3b", 128)):
        for T, floor in ((1, 234.0), (16, 938.0), (4096, 4117.0)):
            us = {"moegen": floor * 2.0, "eager": floor * 30.0, "eager_hf": floor * 3.0, "grouped_mm": floor * 1.3,
                  "triton": floor * 1.1}
            cells.append({"shape": shape, "tokens": T, "experts_touched": min(E, 2 * T), "experts_expected": 2.0,
                          "bytes": int(floor * 3e6), "flops": 2 * T * 2 * 3 * 4096 * 14336, "intensity": 1.0 * T,
                          "floor_us": floor, "bound": "bandwidth", "us": us,
                          "us_hot": {n: v * 0.9 for n, v in us.items()},
                          "rel_err": {n: 5e-3 for n in us}, "ok": {n: True for n in us}, "errors": {},
                          "first_call_s": {n: 0.01 for n in us},
                          "pct_of_floor": {n: floor / v * 100 for n, v in us.items()},
                          "triton": {"best": "M16-N64-K128-G1-w4-s3", "sweep": {}}})
    cells[1]["ok"]["grouped_mm"] = False  # a wrong contender: flagged, not hidden
    cells[1]["rel_err"]["grouped_mm"] = 0.5
    del cells[2]["us"]["triton"], cells[2]["ok"]["triton"]
    cells[2]["errors"]["triton"] = "OutOfResources: shared memory"
    return {"schema": bench_cuda.SCHEMA, "target": "cuda-sm90",
            "machine": {"card": "NVIDIA H100 80GB HBM3", "date": "2026-11-26T21:00:00+00:00", "torch": "2.11.0+cu130",
                        "triton": "3.6.0"},
            "ceilings": {"copy_bytes_per_s": 3.01e12, "copy_bytes_per_s_median": 2.92e12, "copy_tensor_bytes": 1 << 30,
                         "gemm_flops_per_s": 701e12, "gemm_flops_per_s_best": 784e12, "gemm_size": 8192,
                         "gemm_dtype": "bfloat16", "statistic": {"copy": "best", "gemm": "median"}, "seconds": 1.0,
                         "calls": {"copy": 1400, "gemm": 700}},
            "method": {"warmups": 2, "repeats": 5, "replays": 10, "l2_flush_bytes": 100 << 20, "l2_flush": "read",
                       "triton_configs": None},
            "check_tokens": 5, "contenders": list(bench_cuda.CONTENDERS), "tolerance": TOL,
            "shapes": {"mixtral-8x7b": {"load_first_forward_ms": 12.5, "check": {n: {"rel_err": 4e-3, "ok": True}
                                                                                 for n in bench_cuda.CONTENDERS}}},
            "cells": cells}


def test_ceilings_line_names_the_statistic_the_floor_uses():
    c = synthetic_report()["ceilings"]
    assert bench_cuda.ceilings_line(c) == ("ceilings: copy 3.01 TB/s (read + written, 1024 MiB; best call over 1 s; "
                                           "median 2.92), bf16 GEMM 701 TFLOP/s (8192³; median call over 1 s; best 784)")
    old = {k: c[k] for k in ("copy_bytes_per_s", "copy_tensor_bytes", "gemm_flops_per_s", "gemm_size")}
    assert bench_cuda.ceilings_line(old) == ("ceilings: copy 3.01 TB/s (read + written, 1024 MiB; best call), "
                                             "bf16 GEMM 701 TFLOP/s (8192³; best call)")  # a report of sessions 1-9


def test_table_flags_wrong_and_failed_contenders():
    report = json.loads(json.dumps(synthetic_report()))  # what --json writes must round-trip
    table = bench_cuda.format_table(report)
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["shape", "T", "experts", "floor", "µs"]
    assert len(lines) == 2 + len(report["cells"]) + 1  # header, rule, cells, the "!" footnote
    assert "468 (50%)" in lines[2]  # moegen at 2x the floor
    assert "1219 (77%)!" in lines[3]  # the wrong grouped_mm cell, flagged
    assert "error" in lines[4] and "4529 (91%)" not in lines[4]
    assert lines[-1].startswith("! = output differs from moe_ref")
    assert "load + first forward 12.5 ms" in bench_cuda.shapes_lines(report)[0]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = bench_cuda.plot_report(synthetic_report(), tmp_path / "sub" / "roofline.png")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_bench_plot_command(tmp_path):
    pytest.importorskip("matplotlib")
    report = tmp_path / "bench.json"
    report.write_text(json.dumps(synthetic_report()))
    r = CliRunner().invoke(main, ["bench-plot", str(report), "-o", str(tmp_path / "r.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC
    report.write_text(json.dumps({"rows": []}))  # a CPU bench report
    r = CliRunner().invoke(main, ["bench-plot", str(report), "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "not a CUDA bench report" in r.stderr and not (tmp_path / "x.png").exists()


# ---- the contenders against moe_ref ------------------------------------------------------------


def _grouped_mm_on_cpu() -> bool:
    try:
        torch._grouped_mm(torch.zeros(8, 16, dtype=torch.bfloat16), torch.zeros(2, 16, 8, dtype=torch.bfloat16),
                          offs=torch.tensor([3, 8], dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("name", SPECS)
def test_torch_contenders_match_moe_ref(name, T):
    spec = spec_from_dict(SPECS[name])
    w = random_weights(spec, 0)
    x, logits = bench_cuda.cell_inputs(spec, T, "cpu", seed=T)
    ref = moe_ref(spec, w, x, logits)
    eager_hf = torch_moe.EagerLoop(spec, w).plan(logits)(x, logits)
    assert type(eager_hf) is type(ref) and rel_err(eager_hf, ref) < TOL
    dense = torch_moe.dense_loop_moe(spec, w, x, logits)
    assert type(dense) is type(ref) and rel_err(dense, ref) < TOL
    if _grouped_mm_on_cpu():
        grouped = torch_moe.grouped_mm_moe(spec, w, x, logits)
        assert type(grouped) is type(ref) and rel_err(grouped, ref) < TOL


def test_eager_loop_needs_a_plan():
    spec = spec_from_dict(SPECS["silu"])
    with pytest.raises(RuntimeError, match="plan"):
        torch_moe.EagerLoop(spec, random_weights(spec, 0))(torch.zeros(1, 48, dtype=torch.bfloat16), torch.zeros(1, 6))


def test_sort_slots_offsets():
    ids = torch.tensor([[3, 0], [0, 2], [3, 3 - 3]], dtype=torch.int32)  # slots 0..5 -> experts 3 0 0 2 3 0
    order, counts, ends = torch_moe.sort_slots(ids, 5)
    assert order.tolist() == [1, 2, 5, 3, 0, 4]  # grouped by expert, ascending within
    assert counts.tolist() == [3, 0, 1, 2, 0] and ends.tolist() == [3, 3, 4, 6, 6] and ends.dtype == torch.int32


# ---- the Triton baseline's pure-torch parts -----------------------------------------------------


@pytest.mark.parametrize("E,K,T,BM", [(8, 2, 1, 16), (128, 8, 1, 16), (6, 2, 33, 16), (32, 4, 7, 32),
                                      (4, 1, 100, 64), (16, 4, 64, 16), (3, 3, 0, 16)])
def test_align_block_size_matches_dispatch_ref(E, K, T, BM):
    """The sorted order, the expert of each block and the used rows equal moegen.reference.dispatch_ref's
    (the project's own dispatch contract, single rank) over the rows the kernels read."""
    g = torch.Generator().manual_seed(E * 1000 + T)
    rows = [torch.randperm(E, generator=g)[:K] for _ in range(T)]  # K distinct experts per token
    ids = (torch.stack(rows) if rows else torch.zeros(0, K)).to(torch.int32)
    a = align_block_size(ids, E, BM)
    d = dispatch_ref(ids, torch.arange(E, dtype=torch.int32), E, BM)
    used = int(a.num_rows_post_padded)
    assert used == int(d["num_blocks"]) * BM <= a.sorted_ids.numel() == padded_rows(T * K, E, BM)
    assert a.sorted_ids.numel() % BM == 0 and a.expert_ids.numel() == a.sorted_ids.numel() // BM
    assert a.sorted_ids[:used].tolist() == d["sorted_ids"][:used].tolist()
    assert (a.sorted_ids[used:] == T * K).all()  # every row past the used ones is padding
    assert a.expert_ids[:used // BM].tolist() == d["block_expert"][:used // BM].tolist()
    assert (a.expert_ids[used // BM:] == -1).all()
    assert a.sorted_ids.dtype == a.expert_ids.dtype == a.num_rows_post_padded.dtype == torch.int32


@pytest.mark.parametrize("BM", [16, 64])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("name", ["silu", "swigluoai-bias", "grouped-shared"])
def test_triton_data_flow_matches_moe_ref(name, T, BM):
    """The kernels' data flow (blocks of one expert, rows read as x[slot // K], weight in the second GEMM,
    sum over K) emulated in torch on align_block_size's output equals the oracle's routed output."""
    spec = spec_from_dict(SPECS[name])
    w = random_weights(spec, 0)
    x, logits = bench_cuda.cell_inputs(spec, T, "cpu", seed=T)
    ref = moe_ref(spec, w, x, logits)
    ids, tw = torch_moe.route(spec, w, logits)
    got = fused_experts_emulated(x, w["w13"], w["w2"], ids, tw, spec.activation, BM, w.get("w13_bias"),
                                 w.get("w2_bias"), spec.swiglu_alpha, spec.swiglu_limit)
    assert rel_err(got, ref[1] if isinstance(ref, tuple) else ref) < 1e-5  # both fp32 from the same inputs


def test_triton_configs():
    assert config_bucket(1, 2, 8) == "small" and config_bucket(16, 8, 128) == "small"
    assert config_bucket(64, 2, 8) == "medium" and config_bucket(4096, 8, 256) == "large"
    for configs in CONFIG_BUCKETS.values():
        assert 6 <= len(configs) <= 12 and len({c.name for c in configs}) == len(configs)
        assert all(c.block_m >= 16 and c.block_k >= 16 for c in configs)  # tl.dot's smallest tile
    assert len(candidate_configs(1, 2, 8, limit=2)) == 2 and candidate_configs(1, 2, 8)[0].name == "M16-N32-K64-G1-w4-s4"


# ---- the command on a box without a GPU ---------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this box has a GPU: the bench would run")
def test_bench_cuda_without_gpu_is_one_line_exit_2():
    r = CliRunner().invoke(main, ["bench", "--target", "cuda-sm90", "--shapes", "qwen3-30b-a3b", "--tokens", "1"])
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [r.stderr.strip()] and "needs a CUDA GPU" in r.stderr


def test_bench_cuda_l2_flush_takes_read_or_write():
    """A wrong --l2-flush is refused before anything runs, naming the option and what it takes."""
    r = CliRunner().invoke(main, ["bench", "--target", "cuda-sm90", "--l2-flush", "dirty"])
    assert r.exit_code == 2
    assert "--l2-flush" in r.stderr and "'dirty' is not one of 'read', 'write'" in r.stderr


def test_cpu_cache_flush_reads_or_writes_its_buffer():
    """The CPU bench's flush: read (default) sums its buffer and leaves it as it was, write rewrites every
    line; another mode is refused naming --cache-flush, as the CLI's choice does for both families."""
    from moegen.bench import CacheFlush
    from moegen.spec import SpecError

    read, write = CacheFlush(nbytes=1 << 16), CacheFlush("write", nbytes=1 << 16)
    assert read.mode == "read" and read.buf.numel() * 8 == 1 << 16
    before = read.buf.clone()
    read()
    assert torch.equal(read.buf, before)
    write()
    assert torch.equal(write.buf, before + 1)
    with pytest.raises(SpecError, match="--cache-flush.*read [|] write"):
        CacheFlush("dirty")
    r = CliRunner().invoke(main, ["bench", "--cache-flush", "dirty"])
    assert r.exit_code == 2 and "'dirty' is not one of 'read', 'write'" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this box has a GPU: the bench would run")
def test_bench_cuda_path_never_imports_tvm():
    """As on the GPU box (no apache-tvm): the CUDA bench modules import, and the command still refuses
    with its one line instead of an ImportError."""
    code = NO_TVM_PRELUDE + (
        "\nfrom moegen import bench_cuda\nfrom moegen.baselines import torch_moe, triton_moe\nimport moegen.runtime\n"
        "assert 'tvm' not in sys.modules and 'triton' not in sys.modules\n"
        "from moegen.cli import main\nmain(['bench', '--target', 'cuda-sm90'])\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == ["error: --target cuda-sm90 needs a CUDA GPU, and torch "
                                             f"{torch.__version__} sees none (run it on the GPU box: make bench-gpu)"]
