"""A/B of builds of the same layers under the bench's method, on one GPU in one process. Every variant is
loaded on the same weights and run on the same inputs; its output is checked against the fp32 reference
(relative error within the bench's tolerance), compared bitwise with the first variant's (noted, not a
failure: another tile may sum in another order), and a misaligned hidden_states (2 bytes into its buffer)
must give the aligned result (bitwise, or to fp32 rounding on a fused path: gpu_layers.same_output). Then every variant is timed in alternated rounds (CUDA graph, L2 flushed before
each replay: bench_cuda.time_graph), so a drift of the card's clock over the run falls on all alike, each round
starting one variant later than the last, so that none keeps one place in the order (with a fixed order, the
variant timed after a slow one measured 1% fast: docs/perf.md, session 12, runs 80 and 83).

From the repo root on a GPU box (torch and the bundle's wheels, no TVM):
  python3 scripts/ab_bench.py NAME=DIR [NAME=DIR ...]
each DIR an artifacts root holding <layer>/cuda-sm90. Environment: AB_LAYERS (default the bench's four
shapes), AB_TOKENS (default 1,16,64,256), AB_ROUNDS (default 3), MOEGEN_FLUSH (read | write)."""
import os
import statistics
import sys
from pathlib import Path

import torch

from gpu_layers import misaligned, same_output
from moegen.artifact import TOLERANCES, read_manifest
from moegen.bench import _flat, rel_err
from moegen.bench_cuda import (DEFAULT_SHAPES, INPUTS_SEED, L2Flush, cell_inputs, device_weights, reference,
                               time_graph)
from moegen.runtime import MoERunner
from moegen.spec import spec_from_dict

TARGET = "cuda-sm90"
LAYERS = os.environ.get("AB_LAYERS", ",".join(DEFAULT_SHAPES)).split(",")
TOKENS = [int(t) for t in os.environ.get("AB_TOKENS", "1,16,64,256").split(",")]
ROUNDS = int(os.environ.get("AB_ROUNDS", "3"))
REPEATS, REPLAYS = 5, 10  # the bench's defaults


def main(argv: list[str]) -> int:
    variants = dict(a.split("=", 1) for a in argv)
    if not variants or any(not Path(d).is_dir() for d in variants.values()):
        print(__doc__)
        return 2
    device = torch.device("cuda")
    flush = L2Flush(device, os.environ.get("MOEGEN_FLUSH", "read"))
    print(torch.cuda.get_device_name(device), f"| flush {flush.mode} | rounds {ROUNDS} | variants",
          " ".join(f"{k}={v}" for k, v in variants.items()), flush=True)
    failed = 0
    for layer in LAYERS:
        roots = {k: Path(d) / layer / TARGET for k, d in variants.items()}
        spec = spec_from_dict(read_manifest(next(iter(roots.values())))["spec"])
        weights = device_weights(spec, device)
        runners = {k: MoERunner.load(r, weights, device=device) for k, r in roots.items()}
        tol = TOLERANCES[spec.dtype]
        for T in TOKENS:
            x, lg = cell_inputs(spec, T, device, INPUTS_SEED + T)
            outs = {k: r.forward(x, lg) for k, r in runners.items()}
            first = next(iter(outs.values()))
            ref = reference(spec, weights, x, lg)
            notes = [f"rel err {rel_err(first, ref):.1e}"]
            for k, o in outs.items():
                err = rel_err(o, ref)
                mis = same_output(runners[k], T, runners[k].forward(misaligned(x), lg), o)
                bad = err > tol or not mis
                failed += bad
                if bad or not torch.equal(_flat(o), _flat(first)):  # another tile may sum in another order
                    notes.append(f"{k}: rel err {err:.1e}{f' > {tol} FAIL' if err > tol else ''}"
                                 f"{'' if mis else ', misaligned x differs FAIL'}"
                                 f"{'' if bad else ', not bitwise the first'}")
            times = {k: [] for k in runners}
            names = list(runners)
            for i in range(ROUNDS):  # each round starts one variant later: no variant keeps one place in the order
                for k in names[i % len(names):] + names[:i % len(names)]:
                    times[k].append(time_graph(lambda r=runners[k]: r.forward(x, lg), REPEATS, REPLAYS, flush).us)
            cells = " | ".join(f"{k} {statistics.median(v):8.1f} ({' '.join(f'{t:.1f}' for t in v)})"
                               for k, v in times.items())
            print(f"{layer:14s} T={T:5d}  {cells}  [{'; '.join(notes)}]", flush=True)
        del runners, weights
        torch.cuda.empty_cache()
    print("ALL OK" if not failed else f"{failed} FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
