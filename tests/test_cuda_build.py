"""CUDA code generation on the CPU box (no GPU): artifacts build ahead of time with nvcc, embed machine
code (SASS) for the named architecture plus its PTX, and refuse to load where they cannot run.
Correctness on a GPU is checked on the H100 (docs/perf.md), never in CI."""

from __future__ import annotations

import pytest
import torch

from conftest import SPECS
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
    x = next(a for a in m["functions"]["experts_up_decode"] if a["name"] == "x")
    assert not x["shape"][0].isdigit() and x["shape"][1] == "128"


def test_gpu_routing_is_a_warp_per_token_unless_grouped(artifact):
    """schedules/cuda.yaml asks for warp routing; grouped top-k (DeepSeek) keeps a thread per token.
    (Their numbers are checked on a GPU: scripts/gpu_check.py.)"""
    plain = (artifact("tiny", "cuda-sm90") / "moe.cu").read_text()
    grouped = (artifact("deepseek-v3-small", "cuda-sm90") / "moe.cu").read_text()

    def routing(src: str) -> str:  # the routing kernel's definition, up to the next kernel
        start = src.index("routing_kernel(", src.index("routing_kernel(") + 1)
        end = src.find('extern "C" __global__', start)
        return src[start:end if end > 0 else None]

    assert "__shfl_xor_sync" in routing(plain)
    assert "__shfl_xor_sync" not in routing(grouped)
