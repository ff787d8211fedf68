"""Schedule configs as data: frozen dataclasses, read from schedules/*.yaml, checked by one predicate.

Shape legend: T tokens, K top-k, Hp padded hidden, I intermediate per rank, N13 = 2I | I.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..kernels.experts import ExpertShapes

SCHEDULES_DIR = Path(__file__).resolve().parents[2] / "schedules"


@dataclass(frozen=True)
class ExpertsConfig:
    block_m: int  # rows per block of the sorted order
    block_n_up: int  # columns per w13 tile (gated: gate half + up half)
    block_n_down: int  # columns per w2 tile
    combine_n: int  # columns per combine tile
    gather_rows: bool = True  # stage each block's input rows in fp32 before the up GEMM
    grid_blocks: bool = False  # loop over every possible block (predicated): a GPU binds them to the grid
    split_k: int = 1  # GPU: threads (threadIdx.y) sharing one column's reduction
    dispatch_threads: int = 0  # GPU: threads of the one-block dispatch (0: the serial dispatch)


@dataclass(frozen=True)
class PathConfig:
    """One path through the layer (decode, prefill): the runner picks it by token count."""

    name: str
    max_rows_per_expert: float | None  # serves T*K/El <= this (rows per local expert); None: any
    experts: ExpertsConfig


def config_ok(cfg: ExpertsConfig, shapes: ExpertShapes) -> str | None:
    """None when `cfg` can schedule `shapes`, else why not. Every caller (build, tuner) uses this."""
    if cfg.block_m < 1:
        return f"block_m {cfg.block_m} < 1"
    if shapes.gated and cfg.block_n_up % 2:
        return f"block_n_up {cfg.block_n_up} must be even for a gated activation"
    if shapes.n13 % cfg.block_n_up:
        return f"block_n_up {cfg.block_n_up} does not divide N13 {shapes.n13}"
    if shapes.hidden % cfg.block_n_down:
        return f"block_n_down {cfg.block_n_down} does not divide Hp {shapes.hidden}"
    if shapes.hidden % cfg.split_k or shapes.intermediate % cfg.split_k:
        return f"split_k {cfg.split_k} does not divide Hp {shapes.hidden} and I {shapes.intermediate}"
    if shapes.hidden % cfg.combine_n:
        return f"combine_n {cfg.combine_n} does not divide Hp {shapes.hidden}"
    return None


def _fit(n: int, want: int, step: int = 1) -> int:
    """Largest multiple of `step` <= want that divides n (at least `step`)."""
    for d in range(want - want % step, step - 1, -step):
        if n % d == 0:
            return d
    return step


def fit_config(cfg: ExpertsConfig, shapes: ExpertShapes) -> ExpertsConfig:
    """The tuned config shrunk to divisors of this layer's widths (irregular test sizes need it)."""
    step = 2 if shapes.gated else 1
    fitted = dataclasses.replace(
        cfg,
        block_n_up=_fit(shapes.n13, cfg.block_n_up, step) if shapes.gated else _fit(shapes.n13, cfg.block_n_up),
        block_n_down=_fit(shapes.hidden, cfg.block_n_down),
        combine_n=_fit(shapes.hidden, cfg.combine_n),
    )
    if shapes.gated and (shapes.n13 // 2) % (fitted.block_n_up // 2):
        fitted = dataclasses.replace(fitted, block_n_up=2 * _fit(shapes.intermediate, cfg.block_n_up // 2))
    why = config_ok(fitted, shapes)
    assert why is None, why
    return fitted


def load_paths(family: str, data: dict[str, Any] | None = None) -> list[PathConfig]:
    """Paths for a target family from schedules/<family>.yaml (or `data`), last one unbounded."""
    if data is None:
        import yaml

        data = yaml.safe_load((SCHEDULES_DIR / f"{family}.yaml").read_text())
    paths = [PathConfig(name=p["name"], max_rows_per_expert=p.get("max_rows_per_expert"),
                        experts=ExpertsConfig(**p["experts"])) for p in data["paths"]]
    if not paths or paths[-1].max_rows_per_expert is not None:
        raise ValueError(f"schedules/{family}.yaml: the last path must have max_rows_per_expert: null")
    return paths




def path_records(paths: list[PathConfig], shapes: ExpertShapes) -> list[dict]:
    """What the manifest stores of each path: its bucket bound and the config fitted to this layer."""
    return [{"name": p.name, "max_rows_per_expert": p.max_rows_per_expert,
             "config": dataclasses.asdict(fit_config(p.experts, shapes))} for p in paths]


def load_routing_config(family: str) -> dict:
    """The optional `routing:` section of schedules/<family>.yaml (GPU: warps_per_block)."""
    import yaml

    return dict((yaml.safe_load((SCHEDULES_DIR / f"{family}.yaml").read_text()) or {}).get("routing") or {})
