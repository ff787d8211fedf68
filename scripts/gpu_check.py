"""H100 check: verify CUDA artifacts, CUDA-graph capture, and a first timing (run from the repo root)."""
import os, sys, time, json, torch
from pathlib import Path
from moegen.verify import verify_artifact
from moegen.runtime import MoERunner
from moegen.reference import random_weights, moe_ref
from moegen.spec import spec_from_dict
from moegen.artifact import read_manifest

ART = Path(os.environ.get("MOEGEN_GPU_ARTIFACTS", "gpu-bundle/artifacts"))
print(torch.cuda.get_device_name(), torch.__version__, flush=True)
results = {}
for root in sorted(r for r in ART.glob("*/cuda-sm90") if "tp2" not in str(r) and "ep2" not in str(r)):
    name = root.parent.name
    toks = [0, 1, 7, 64, 129, 1000, 4096] if name != "qwen3-30b-a3b" else [1, 7, 64, 129]
    t0 = time.time()
    try:
        ok = verify_artifact(root, toks, device="cuda", echo=lambda s: print("  " + s, flush=True))
    except Exception as e:
        ok = False; print("  ERROR", type(e).__name__, str(e)[:2000], flush=True)
    results[name] = ok
    print(f"{name}: {'PASS' if ok else 'FAIL'} ({time.time()-t0:.1f} s)", flush=True)

# CUDA graph capture: replay equals eager
root = ART / "deepseek-v3-small/cuda-sm90"
spec = spec_from_dict(read_manifest(root)["spec"])
w = random_weights(spec, 3)
t0 = time.perf_counter(); r = MoERunner.load(root, w, device="cuda"); torch.cuda.synchronize()
x = torch.randn(33, spec.hidden_size, device="cuda").bfloat16(); lg = torch.randn(33, spec.num_experts, device="cuda")
out = r(x, lg); torch.cuda.synchronize()
print(f"load + first forward {(time.perf_counter()-t0)*1e3:.1f} ms", flush=True)
eager = [o.clone() for o in out]
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    for _ in range(2): r(x, lg)
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    gout = r(x, lg)
x.copy_(torch.randn_like(x)); g.replay(); torch.cuda.synchronize()
ref = r(x, lg)
same = all(torch.equal(a, b) for a, b in zip(gout, ref))
print("cuda graph replay == eager on new inputs:", same, flush=True)

# first timing, qwen3 real size (moegen eager launches vs graph) -- no tuning yet
root = ART / "qwen3-30b-a3b/cuda-sm90"
if root.exists():
    spec = spec_from_dict(read_manifest(root)["spec"])
    w = {k: v.cuda() for k, v in random_weights(spec, 1).items()}
    r = MoERunner.load(root, w, device="cuda")
    for T in (1, 16, 64, 256, 1024, 4096):
        x = torch.randn(T, spec.hidden_size, device="cuda").bfloat16(); lg = torch.randn(T, spec.num_experts, device="cuda")
        for _ in range(3): r(x, lg)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            r(x, lg)
        for _ in range(3): g.replay()
        torch.cuda.synchronize(); n = 20; t0 = time.perf_counter()
        for _ in range(n): g.replay()
        torch.cuda.synchronize(); us = (time.perf_counter() - t0) / n * 1e6
        print(f"qwen3 T={T}: moegen graph replay {us:.0f} us", flush=True)
print(json.dumps(results))
