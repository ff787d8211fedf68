"""Where a decode forward's time goes under the bench's method (CUDA graph, L2 flushed before each timed
replay): the kernels of the decode path timed alone, as growing prefixes of the chain and as its
suffixes (what fusing the first kernels away could save at most), next to a graph of one tiny kernel (the
replay's own cost), read-only streams of the same bytes (torch's sum) and the best read stream a small
Triton sweep finds for 25 / 50 / 75 MB (what a GEMV pair could reach at most). From scripts/ on a GPU box:
MOEGEN_BREAKDOWN (default qwen3-30b-a3b,gpt-oss-20b), MOEGEN_GPU_ARTIFACTS, MOEGEN_BREAKDOWN_TOKENS (default
1), MOEGEN_FLUSH (read | write: L2Flush), MOEGEN_BREAKDOWN_QUICK=1 (the forward alone),
MOEGEN_BREAKDOWN_STREAM=0 (no Triton sweep)."""
import os

import torch

from gpu_layers import layer_inputs, load_layer
from moegen.bench_cuda import L2Flush, time_graph
from moegen.runtime.runner import pick_path

NAMES = os.environ.get("MOEGEN_BREAKDOWN", "qwen3-30b-a3b,gpt-oss-20b").split(",")
TOKENS = [int(t) for t in os.environ.get("MOEGEN_BREAKDOWN_TOKENS", "1").split(",")]
REPEATS, REPLAYS = 5, 20
QUICK = os.environ.get("MOEGEN_BREAKDOWN_QUICK") == "1"  # the whole forward only

print(torch.cuda.get_device_name(), flush=True)
FLUSH = L2Flush(torch.device("cuda"), os.environ.get("MOEGEN_FLUSH", "read"))  # the bench's (read | write)
print(f"flush: {FLUSH.mode}")


def us(fn):
    return time_graph(fn, REPEATS, REPLAYS, FLUSH).us


tiny = torch.zeros(256, device="cuda")
print(f"graph of one tiny kernel: {us(lambda: tiny.add_(1)):.1f} us", flush=True)
for name in NAMES:
    spec, r = load_layer(name)
    for T in TOKENS:
        x, lg = layer_inputs(spec, T)
        path = pick_path(r.paths, T, spec.top_k, spec.local_experts)
        c, n = path["config"], path["name"]
        w13, b13, w2, b2 = r._packed[(c["block_n_up"], c["block_n_down"])]
        b, f = r._staging(path, T), r._fns
        out = torch.empty(T, spec.kernel_hidden, dtype=x.dtype, device="cuda")
        grid = (r._n_sm,) if c.get("warp_specialized") else ()
        with r._stream():
            steps = {
                "route": lambda: f[f"route_dispatch_{n}"](lg, r.correction_bias, r.expert_map, b["ids"], b["tw"],
                                                           b["sorted_ids"], b["block_expert"], b["num_blocks"],
                                                           b["slot_pos"]),
                "up": lambda: f[f"experts_up_{n}"](x, b["tw"], b["sorted_ids"], b["block_expert"], b["num_blocks"],
                                                   w13, b13, b["act"], *grid),
                "down": lambda: f[f"experts_down_{n}"](b["act"], b["tw"], b["sorted_ids"], b["block_expert"],
                                                       b["num_blocks"], w2, b2, b["y"], *grid),
                "combine": lambda: f[f"combine_{n}"](b["y"], b["slot_pos"], out),
            }

            def chain(names):
                def run():
                    with r._stream():
                        for s in names:
                            steps[s]()
                return run

            order = list(steps)
            chain(order)()
            torch.cuda.synchronize()
            ids = b["ids"].flatten().long()
            up_bytes = w13[0].numel() * w13.element_size() * len(set(ids.tolist()))
            down_bytes = w2[0].numel() * w2.element_size() * len(set(ids.tolist()))
            line = [f"{name} T={T} path {n}:"]
            if QUICK:
                print(f"{name} T={T} forward {us(lambda: r(x, lg)):.1f}", flush=True)
                continue
            for s in order:
                line.append(f"{s} alone {us(chain([s])):.1f}")
            for i in range(2, len(order) + 1):
                line.append(f"{'+'.join(order[:i])} {us(chain(order[:i])):.1f}")
            for i in range(1, len(order) - 1):  # suffixes: the chain without its first kernels (their
                # buffers still hold the last full chain's results), what a fused kernel could save at most
                line.append(f"{'+'.join(order[i:])} {us(chain(order[i:])):.1f}")
            line.append(f"up+down {us(chain(['up', 'down'])):.1f}")
            line.append(f"forward {us(lambda: r(x, lg)):.1f}")
            # read-only streams of the touched weights' bytes (torch's sum: one kernel each)
            src_up = torch.randn(up_bytes // 2, device="cuda").to(torch.bfloat16)
            src_dn = torch.randn(down_bytes // 2, device="cuda").to(torch.bfloat16)
            line.append(f"sum of {up_bytes / 1e6:.1f} MB {us(lambda: src_up.sum()):.1f}")
            line.append(f"sum of {down_bytes / 1e6:.1f} MB {us(lambda: src_dn.sum()):.1f}")
            line.append(f"both sums {us(lambda: (src_up.sum(), src_dn.sum())):.1f}")
            del src_up, src_dn
        print("; ".join(line), flush=True)
    del r
    torch.cuda.empty_cache()

# the best read stream Triton finds for these sizes: what a GEMV pair could reach at most
if os.environ.get("MOEGEN_BREAKDOWN_STREAM", "1") == "1":
    import triton
    import triton.language as tl

    @triton.jit
    def _stream(src, part, n, BLOCK: tl.constexpr):
        pid, npg = tl.program_id(0), tl.num_programs(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(pid * BLOCK, n, npg * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(src + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(part + pid, tl.sum(acc, 0))

    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    for mb in (25, 50, 75):
        src = torch.ones(mb * 1000 * 1000 // 2, dtype=torch.bfloat16, device="cuda")
        part = torch.empty(64 * n_sm, device="cuda")
        best = None
        for per_sm in (1, 2, 4, 8, 16):
            for block in (2048, 4096, 8192):
                for warps in (4, 8):
                    g = per_sm * n_sm
                    t = us(lambda: _stream[(g,)](src, part, src.numel(), BLOCK=block, num_warps=warps))
                    if best is None or t < best[0]:
                        best = (t, per_sm, block, warps)
        t, per_sm, block, warps = best
        print(f"triton stream of {mb} MB: best {t:.1f} us ({mb * 1e6 / t / 1e12 * 1e6:.2f} TB/s incl. the "
              f"replay), {per_sm} blocks/SM, BLOCK {block}, {warps} warps", flush=True)
        del src

# does the flush evict? a 25 MB read timed hot (back to back) and after the flush
small = torch.randn(25 << 19, device="cuda").to(torch.bfloat16)
t = time_graph(lambda: small.sum(), REPEATS, REPLAYS, FLUSH)
print(f"sum of 25 MB: after the flush {t.us:.1f} us, hot {t.us_hot:.1f} us")
