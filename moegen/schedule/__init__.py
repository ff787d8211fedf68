"""Schedule rules per target family; configs come from schedules/ (never literals in rule bodies)."""

from __future__ import annotations

# The grid dependency wait of programmatic dependent launch, as a call the build defines per target
# (build.GRID_WAIT_DEFINITION: griddepcontrol.wait with programmatic_launch, nothing without). A kernel
# that calls it (cuda._wait_after_first_weights) gets no wait at its entry (build.add_programmatic_launch).
GRID_WAIT = "moegen_grid_wait"


def rules(family: str):
    """The module of schedule rules for a target family (routing, dispatch, experts_up, ...)."""
    if family == "cpu":
        from . import cpu

        return cpu
    if family == "cuda":
        from . import cuda

        return cuda
    raise ValueError(f"no schedule rules for target family {family!r} (available: cpu, cuda)")
