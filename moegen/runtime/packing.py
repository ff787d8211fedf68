"""Weight packing into the kernels' column-tile layouts (done once, at load). torch only.

Shape legend: E(l) experts, H(p) hidden, I intermediate, N13 = 2I | I, BN tile width, NT tiles.
See moegen/kernels/experts.py for the layouts.
"""

from __future__ import annotations

import torch


def pack_w13(w13: torch.Tensor, block_n: int, gated: bool) -> torch.Tensor:
    """[E, N13, Hp] -> [E, N13/BN, Hp, BN]; gated tiles hold BN/2 gate columns then the matching up ones."""
    E, N, H = w13.shape
    if gated:
        I, half = N // 2, block_n // 2
        tiles = torch.cat([w13[:, :I].reshape(E, I // half, half, H), w13[:, I:].reshape(E, I // half, half, H)], 2)
    else:
        tiles = w13.reshape(E, N // block_n, block_n, H)
    return tiles.transpose(2, 3).contiguous()


def pack_b13(b13: torch.Tensor, block_n: int, gated: bool) -> torch.Tensor:
    """[E, N13] -> [E, N13/BN, BN] in the same column order as pack_w13."""
    return pack_w13(b13[:, :, None], block_n, gated)[:, :, 0, :].contiguous()


def pack_w2(w2: torch.Tensor, block_n: int) -> torch.Tensor:
    """[E, Hp, I] -> [E, Hp/BN, I, BN]."""
    E, H, I = w2.shape
    return w2.reshape(E, H // block_n, block_n, I).transpose(2, 3).contiguous()


def pack_b2(b2: torch.Tensor, block_n: int) -> torch.Tensor:
    """[E, Hp] -> [E, Hp/BN, BN]."""
    E, H = b2.shape
    return b2.reshape(E, H // block_n, block_n).contiguous()
