"""Per-kernel GPU time of one forward (torch.profiler), Qwen3-30B-A3B at real size; from the repo root."""
import os, torch
from pathlib import Path
from torch.profiler import profile, ProfilerActivity
from moegen.runtime import MoERunner
from moegen.reference import random_weights
from moegen.spec import spec_from_dict
from moegen.artifact import read_manifest

root = Path(os.environ.get("MOEGEN_GPU_ARTIFACTS", "gpu-bundle/artifacts")) / "qwen3-30b-a3b/cuda-sm90"
spec = spec_from_dict(read_manifest(root)["spec"])
r = MoERunner.load(root, {k: v.cuda() for k, v in random_weights(spec, 1).items()}, device="cuda")
print(torch.cuda.get_device_name())
for T in (1, 16, 64, 256):
    x = torch.randn(T, spec.hidden_size, device="cuda").bfloat16(); lg = torch.randn(T, spec.num_experts, device="cuda")
    for _ in range(3): r(x, lg)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5): r(x, lg)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / 5) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda kv: -kv[1])
    print(f"T={T}: " + "; ".join(f"{k[:40]} {us:.0f} us" for k, us in rows[:8]), flush=True)
