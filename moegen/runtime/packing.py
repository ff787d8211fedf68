"""Weight packing into the kernels' column-tile layouts (done once, at load). torch only.

Shape legend: E(l) experts, H(p) hidden, I intermediate, N13 = 2I | I, BN tile width, NT tiles.
See moegen/kernels/experts.py for the layouts.
"""

from __future__ import annotations

import torch


CHUNK_BYTES = 256 << 20  # experts packed per copy: few launches, bounded extra memory


def _chunks(t: torch.Tensor):
    """Expert ranges [e0, e1) of about CHUNK_BYTES each (at least one expert)."""
    E = t.shape[0]
    per = max(1, CHUNK_BYTES // max(1, t[0].numel() * t.element_size()))
    return ((e0, min(E, e0 + per)) for e0 in range(0, E, per))


def pack_w13(w13: torch.Tensor, block_n: int, gated: bool) -> torch.Tensor:
    """[E, N13, Hp] -> [E, N13/BN, Hp, BN]; gated tiles hold BN/2 gate columns then the matching up ones.
    Packs a chunk of experts per copy into one new tensor: peak memory is the packed copy plus a chunk."""
    E, N, H = w13.shape
    out = torch.empty(E, N // block_n, H, block_n, dtype=w13.dtype, device=w13.device)
    half = block_n // 2
    for e0, e1 in _chunks(w13):
        n = e1 - e0
        if gated:
            I = N // 2
            gate = w13[e0:e1, :I].reshape(n, I // half, half, H)
            up = w13[e0:e1, I:].reshape(n, I // half, half, H)
            out[e0:e1, :, :, :half] = gate.transpose(2, 3)
            out[e0:e1, :, :, half:] = up.transpose(2, 3)
        else:
            out[e0:e1] = w13[e0:e1].reshape(n, N // block_n, block_n, H).transpose(2, 3)
    return out


def pack_b13(b13: torch.Tensor, block_n: int, gated: bool) -> torch.Tensor:
    """[E, N13] -> [E, N13/BN, BN] in the same column order as pack_w13."""
    return pack_w13(b13[:, :, None], block_n, gated)[:, :, 0, :].contiguous()


def pack_w2(w2: torch.Tensor, block_n: int) -> torch.Tensor:
    """[E, Hp, I] -> [E, Hp/BN, I, BN], a chunk of experts per copy."""
    E, H, I = w2.shape
    out = torch.empty(E, H // block_n, I, block_n, dtype=w2.dtype, device=w2.device)
    for e0, e1 in _chunks(w2):
        out[e0:e1] = w2[e0:e1].reshape(e1 - e0, H // block_n, block_n, I).transpose(2, 3)
    return out


def pack_b2(b2: torch.Tensor, block_n: int) -> torch.Tensor:
    """[E, Hp] -> [E, Hp/BN, BN]."""
    E, H = b2.shape
    return b2.reshape(E, H // block_n, block_n).contiguous()
