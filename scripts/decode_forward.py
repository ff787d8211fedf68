"""A few eager forwards of one real-size artifact at MOEGEN_TOKENS (default 1) tokens: the program a
kernel profiler (ncu) wraps. From the repo root on a GPU box: MOEGEN_PROFILE (default qwen3-30b-a3b)."""
import os

import torch

from gpu_layers import layer_inputs, load_layer

spec, r = load_layer(os.environ.get("MOEGEN_PROFILE", "qwen3-30b-a3b"))
x, lg = layer_inputs(spec, int(os.environ.get("MOEGEN_TOKENS", "1")))
for _ in range(3):
    r(x, lg)
torch.cuda.synchronize()
