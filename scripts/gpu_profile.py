"""Per-kernel GPU time of one forward (torch.profiler) of real-size artifacts; from the repo root.
MOEGEN_PROFILE: comma list of artifact names in MOEGEN_GPU_ARTIFACTS (default qwen3-30b-a3b);
MOEGEN_PROFILE_TOKENS: token counts (default 1,16,64,256)."""
import os, torch
from pathlib import Path
from torch.profiler import profile, ProfilerActivity
from moegen.runtime import MoERunner
from moegen.reference import random_weights
from moegen.spec import spec_from_dict
from moegen.artifact import read_manifest

ART = Path(os.environ.get("MOEGEN_GPU_ARTIFACTS", "gpu-bundle/artifacts"))
NAMES = os.environ.get("MOEGEN_PROFILE", "qwen3-30b-a3b").split(",")
TOKENS = [int(t) for t in os.environ.get("MOEGEN_PROFILE_TOKENS", "1,16,64,256").split(",")]
print(torch.cuda.get_device_name())
for name in NAMES:
    root = ART / name / "cuda-sm90"
    spec = spec_from_dict(read_manifest(root)["spec"])
    r = MoERunner.load(root, random_weights(spec, 1, device="cuda"), device="cuda")
    for T in TOKENS:
        x = torch.randn(T, spec.hidden_size, device="cuda").to(getattr(torch, spec.dtype))
        lg = torch.randn(T, spec.num_experts, device="cuda")
        for _ in range(3): r(x, lg)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5): r(x, lg)
            torch.cuda.synchronize()
        rows = [(e.key, e.device_time_total / 5) for e in prof.key_averages() if e.device_time_total > 0]
        rows.sort(key=lambda kv: -kv[1])
        print(f"{name} T={T}: " + "; ".join(f"{k[:40]} {us:.0f} us" for k, us in rows[:8]), flush=True)
    del r
    torch.cuda.empty_cache()
