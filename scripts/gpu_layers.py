"""What the GPU scripts (gpu_check, gpu_profile, decode_breakdown, decode_forward, ab_bench) share: a real-size
layer of the bundle on the GPU with random weights, random inputs for it, and a misaligned copy of an input.
Imported from scripts/ run as files."""
import os
from pathlib import Path

import torch

from moegen.artifact import read_manifest
from moegen.reference import random_weights
from moegen.runtime import MoERunner
from moegen.spec import spec_from_dict

ART = Path(os.environ.get("MOEGEN_GPU_ARTIFACTS", "gpu-bundle/artifacts"))


def load_layer(name: str, target: str = "cuda-sm90"):
    """(spec, MoERunner) of ART/<name>/<target>, weights drawn on the GPU (seed 1)."""
    root = ART / name / target
    spec = spec_from_dict(read_manifest(root)["spec"])
    return spec, MoERunner.load(root, random_weights(spec, 1, device="cuda"), device="cuda")


def layer_inputs(spec, T: int):
    """hidden_states [T, H] in the spec's dtype and fp32 router logits [T, E], random, on the GPU."""
    x = torch.randn(T, spec.hidden_size, device="cuda").to(getattr(torch, spec.dtype))
    return x, torch.randn(T, spec.num_experts, device="cuda")


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """x's values in a contiguous view that starts 2 bytes into its buffer (mid-vector for 16-byte loads)."""
    view = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view_as(x)
    view.copy_(x)
    return view


# A fused decode path (config.fused) sums its slots' outputs with atomics, in whatever order the blocks finish:
# two runs on one input agree to fp32 rounding, not bitwise. Outputs of such a path are "the same" within this
# relative error (a misaligned-input bug gives garbage, orders of magnitude above it).
REASSOCIATION_RTOL = 1e-3


def same_output(runner: MoERunner, T: int, a, b) -> bool:
    """Whether two outputs of `runner` at T tokens are the same result: bitwise, or within REASSOCIATION_RTOL
    where the path it picks for T tokens sums with atomics (fused)."""
    from moegen.bench import _flat, rel_err
    from moegen.runtime.runner import pick_path

    spec = runner.spec
    if not pick_path(runner.paths, T, spec.top_k, spec.local_experts)["config"].get("fused"):
        return torch.equal(_flat(a), _flat(b))
    return rel_err(a, b) <= REASSOCIATION_RTOL
