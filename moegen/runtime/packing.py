"""Weight packing into the kernels' column-tile layouts (done once, at load). torch only.

Shape legend: E(l) experts, H(p) hidden, I intermediate, N13 = 2I | I, BN tile width, NT tiles.
See moegen/kernels/experts.py for the layouts.
"""

from __future__ import annotations

import torch


def pack_w13(w13: torch.Tensor, block_n: int, gated: bool) -> torch.Tensor:
    """[E, N13, Hp] -> [E, N13/BN, Hp, BN]; gated tiles hold BN/2 gate columns then the matching up ones.
    Packs expert by expert into one new tensor: peak memory is the packed copy plus one expert."""
    E, N, H = w13.shape
    out = torch.empty(E, N // block_n, H, block_n, dtype=w13.dtype, device=w13.device)
    half = block_n // 2
    for e in range(E):
        if gated:
            I = N // 2
            gate, up = w13[e, :I].reshape(I // half, half, H), w13[e, I:].reshape(I // half, half, H)
            out[e, :, :, :half] = gate.transpose(1, 2)
            out[e, :, :, half:] = up.transpose(1, 2)
        else:
            out[e] = w13[e].reshape(N // block_n, block_n, H).transpose(1, 2)
    return out


def pack_b13(b13: torch.Tensor, block_n: int, gated: bool) -> torch.Tensor:
    """[E, N13] -> [E, N13/BN, BN] in the same column order as pack_w13."""
    return pack_w13(b13[:, :, None], block_n, gated)[:, :, 0, :].contiguous()


def pack_w2(w2: torch.Tensor, block_n: int) -> torch.Tensor:
    """[E, Hp, I] -> [E, Hp/BN, I, BN], expert by expert."""
    E, H, I = w2.shape
    out = torch.empty(E, H // block_n, I, block_n, dtype=w2.dtype, device=w2.device)
    for e in range(E):
        out[e] = w2[e].reshape(H // block_n, block_n, I).transpose(1, 2)
    return out


def pack_b2(b2: torch.Tensor, block_n: int) -> torch.Tensor:
    """[E, Hp] -> [E, Hp/BN, BN]."""
    E, H = b2.shape
    return b2.reshape(E, H // block_n, block_n).contiguous()
