"""Schedule rules per target family; configs come from schedules/ (never literals in rule bodies)."""

from __future__ import annotations


def rules(family: str):
    """The module of schedule rules for a target family (routing, dispatch, experts_up, ...)."""
    if family == "cpu":
        from . import cpu

        return cpu
    if family == "cuda":
        from . import cuda

        return cuda
    raise ValueError(f"no schedule rules for target family {family!r} (available: cpu, cuda)")
