"""Per-kernel GPU time of one forward (torch.profiler) of real-size artifacts; from the repo root.
With programmatic dependent launch (cuda-sm90) a kernel's span includes its wait for the kernel before it:
scripts/decode_breakdown.py times the chain instead.
MOEGEN_PROFILE: comma list of artifact names in MOEGEN_GPU_ARTIFACTS (default qwen3-30b-a3b);
MOEGEN_PROFILE_TOKENS: token counts (default 1,16,64,256)."""
import os, torch
from torch.profiler import profile, ProfilerActivity
from gpu_layers import layer_inputs, load_layer

NAMES = os.environ.get("MOEGEN_PROFILE", "qwen3-30b-a3b").split(",")
TOKENS = [int(t) for t in os.environ.get("MOEGEN_PROFILE_TOKENS", "1,16,64,256").split(",")]
print(torch.cuda.get_device_name())
for name in NAMES:
    spec, r = load_layer(name)
    for T in TOKENS:
        x, lg = layer_inputs(spec, T)
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
