"""Baselines that `moegen bench` times moegen against (not used by the runner).

triton_moe: a Triton fused-MoE (vLLM's algorithm), imported only on a GPU box; its pure-torch parts
(block alignment, configs) import without triton.
"""
