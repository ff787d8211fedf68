"""A few eager forwards of one real-size artifact at MOEGEN_TOKENS (default 1) tokens: the program a
kernel profiler (ncu) wraps. From the repo root on a GPU box: MOEGEN_PROFILE (default qwen3-30b-a3b)."""
import os
from pathlib import Path

import torch

from moegen.artifact import read_manifest
from moegen.reference import random_weights
from moegen.runtime import MoERunner
from moegen.spec import spec_from_dict

root = Path(os.environ.get("MOEGEN_GPU_ARTIFACTS", "gpu-bundle/artifacts")) / os.environ.get(
    "MOEGEN_PROFILE", "qwen3-30b-a3b") / "cuda-sm90"
spec = spec_from_dict(read_manifest(root)["spec"])
r = MoERunner.load(root, random_weights(spec, 1, device="cuda"), device="cuda")
T = int(os.environ.get("MOEGEN_TOKENS", "1"))
x = torch.randn(T, spec.hidden_size, device="cuda").to(getattr(torch, spec.dtype))
lg = torch.randn(T, spec.num_experts, device="cuda")
for _ in range(3):
    r(x, lg)
torch.cuda.synchronize()
