"""The runner as torch.library custom ops, so models using it compile with torch.compile(fullgraph=True)
and capture in CUDA graphs as one opaque node (vLLM's moe_forward / moe_forward_shared).

Two ops because a schema cannot return "Tensor or (Tensor, Tensor)" (the seed explains the same split):
    torch.ops.moegen.moe_forward(hidden [T, H], router_logits [T, E]?, layer) -> routed [T, Hr]
    torch.ops.moegen.moe_forward_shared(hidden, router_logits?, layer) -> (shared [T, H], routed [T, Hr])
A runner is found by its layer name (custom ops take no Python objects): `register_layer(name, runner)`,
or `MoERunner.as_op(name)` which registers and returns a callable.
"""

from __future__ import annotations

import torch

_LAYERS: dict[str, object] = {}


def register_layer(name: str, runner) -> None:
    """Make `runner` reachable from the ops as `name` (a model's layer name, unique per process)."""
    _LAYERS[name] = runner


def _runner(layer: str):
    try:
        return _LAYERS[layer]
    except KeyError:
        raise KeyError(f"moegen op: no runner registered as {layer!r} (register_layer(name, runner) first); "
                       f"registered: {sorted(_LAYERS)}") from None


@torch.library.custom_op("moegen::moe_forward", mutates_args=())
def moe_forward(hidden_states: torch.Tensor, router_logits: torch.Tensor | None, layer: str) -> torch.Tensor:
    out = _runner(layer).forward(hidden_states, router_logits)
    if isinstance(out, tuple):
        raise ValueError(f"moegen op: layer {layer!r} has shared experts; call moe_forward_shared")
    return out


@moe_forward.register_fake
def _(hidden_states, router_logits, layer):
    spec = _runner(layer).spec
    return hidden_states.new_empty(hidden_states.shape[0], spec.routed_width)


@torch.library.custom_op("moegen::moe_forward_shared", mutates_args=())
def moe_forward_shared(hidden_states: torch.Tensor, router_logits: torch.Tensor | None,
                       layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = _runner(layer).forward(hidden_states, router_logits)
    if not isinstance(out, tuple):
        raise ValueError(f"moegen op: layer {layer!r} has no shared experts; call moe_forward")
    return out


@moe_forward_shared.register_fake
def _(hidden_states, router_logits, layer):
    spec = _runner(layer).spec
    T = hidden_states.shape[0]
    return hidden_states.new_empty(T, spec.hidden_size), hidden_states.new_empty(T, spec.routed_width)
