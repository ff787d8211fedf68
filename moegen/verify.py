"""`moegen verify`: an artifact's golden vectors, then fresh random inputs against the reference.
Runs on a deploy box: needs tvm-ffi, torch and onnx, never apache-tvm.

Shape legend: T tokens, E experts, H hidden, Hr routed width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .artifact import TOLERANCES, ArtifactError, load_tensor, read_manifest, weights_digest
from .reference import moe_ref, random_weights
from .runtime import MoERunner
from .spec import spec_from_dict


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 norm of the error (0 for two empty tensors)."""
    want = want.float()
    num = (got.float() - want).norm().item()
    den = want.norm().item()
    return num / den if den > 0 else num


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def verify_artifact(root: Path, tokens: list[int], *, seed: int = 0, golden: bool = True, device: str = "auto",
                    echo: Callable[[str], None] = print) -> bool:
    """True when every case is within the dtype's tolerance. Prints one line per case."""
    m = read_manifest(root)
    if device == "auto":
        device = "cuda" if m["target"]["family"] == "cuda" else "cpu"
    spec = spec_from_dict(m["spec"])
    tol = TOLERANCES[spec.dtype]
    dt = getattr(torch, spec.dtype)
    g = m.get("golden", {})
    ok = True
    weights = None
    if golden and "sets" in g:
        weights = random_weights(spec, g["seed"])
        got = weights_digest(weights)
        bad = [n for n, h in g["weights_sha256"].items() if got.get(n) != h]
        if bad:
            raise ArtifactError(f"{root}: golden weights regenerated here differ from the build's in {bad} "
                                f"(torch {torch.__version__} draws other numbers); use --no-golden")
    elif golden:
        echo(f"golden: none in this artifact ({g.get('skipped', 'not recorded')})")
    if weights is None:
        weights = random_weights(spec, seed + 1)
    runner = MoERunner.load(root, weights, device=device)
    if golden and "sets" in g:
        for s in g["sets"]:
            d = root / s["dir"]
            x = load_tensor(d / "input_0.pb").to(dt).to(device)
            logits = load_tensor(d / "input_1.pb").to(device)
            outs = _as_tuple(runner(x, logits))
            for j, (name, o) in enumerate(zip(s["outputs"], outs)):
                err = rel_error(o.cpu(), load_tensor(d / f"output_{j}.pb"))
                good = err <= tol
                ok &= good
                echo(f"golden {s['dir']:<28} T={s['tokens']:<5} {name:<10} err {err:.2e}  tol {tol:.1e}  "
                     f"{'ok' if good else 'MISMATCH'}")
    gen = torch.Generator().manual_seed(seed)
    for T in tokens:
        x = torch.randn(T, spec.hidden_size, generator=gen).to(dt)
        logits = torch.randn(T, spec.num_experts, generator=gen) * 2
        outs = _as_tuple(runner(x.to(device), logits.to(device)))
        refs = _as_tuple(moe_ref(spec, weights, x, logits))
        names = ("shared_out", "routed_out") if len(refs) == 2 else ("routed_out",)
        for name, o, r in zip(names, outs, refs):
            if tuple(o.shape) != tuple(r.shape):
                ok = False
                echo(f"random T={T:<5} {name:<10} shape {tuple(o.shape)} != reference {tuple(r.shape)}  MISMATCH")
                continue
            err = rel_error(o.cpu(), r)
            good = err <= tol
            ok &= good
            echo(f"random T={T:<5} {name:<10} err {err:.2e}  tol {tol:.1e}  {'ok' if good else 'MISMATCH'}")
    return ok
