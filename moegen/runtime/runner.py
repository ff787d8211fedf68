"""MoERunner: runs one MoE layer from an artifact with the semantics of vLLM's MoERunnerBase.
Imports tvm_ffi and torch only (through loader.py), never apache-tvm.

Shape legend: T tokens, E experts, El local experts, K top-k, H hidden, Hr routed width (L or H),
Hp padded hidden (kernel width), Hx the columns of x the up GEMMs read (Hr rounded up, at most Hp), I intermediate per rank, Is shared intermediate,
MB blocks at most = ceil(T*K / BM) + El, MP = MB * BM sorted rows.

Forward (seed: shared/seed/moe_runner_base.txt):
  1. routed-input transform (latent_proj): routed experts see [T, L], shared experts [T, H]
  2. pad the routed input to Hx with zeros (w13's columns past Hx are zeros: the kernels stop there)
  3. gate (when the runner holds one): router logits in fp32
  4-7. kernels: routing -> dispatch -> experts_up -> experts_down -> combine (all router options,
       activations, biases and routing weights are computed there); a path without the sort
       (decode) runs route_dispatch -> experts_up -> experts_down -> combine, or with config.fused
       route_dispatch -> experts_fused (one kernel from x to the output; with config.fused_routing it routes
       the token itself: experts_fused alone)
  8. shared experts (dense MLP in torch), before the routed experts (NO_OVERLAP)
  9. truncate to the original widths; all-reduce over the TP/EP group when asked
 10. return routed, or (shared, routed)
Every buffer comes from torch's allocator on the input's device; nothing synchronises with the host.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
import tvm_ffi

from ..artifact import ArtifactError
from ..reference import activation_ref, max_blocks, tile_counts_size  # pure torch, shared with the oracle
from ..spec import OPTIONAL_WEIGHTS, MoESpec, spec_from_dict, weights_contract
from . import packing
from .loader import load_artifact

# The tensor-core paths copy x's rows into shared memory 16 bytes at a time (cp.async); the rows' width (Hx,
# a multiple of spec.X_STEP, or Hr padded to it) keeps every row aligned when x's first element is, so
# hidden_states that start elsewhere are copied first (H100: a misaligned address otherwise; docs/perf.md).
INPUT_ALIGN_BYTES = 16


SHARED_ORDERS = ("before", "overlap")


class RunnerInputError(ValueError):
    """A tensor the runner cannot take: says which argument, what it got and what it needs."""


def pick_path(paths: list[dict], num_tokens: int, top_k: int, local_experts: int) -> dict:
    """The bucket function: the first path whose max_rows_per_expert admits T*K/El, the average rows
    each local expert gets (a host-side number: no synchronisation)."""
    rows = num_tokens * top_k / local_experts
    for p in paths:
        if p["max_rows_per_expert"] is None or rows <= p["max_rows_per_expert"]:
            return p
    raise AssertionError("the last path has no token limit")


def expert_map(spec: MoESpec, ep_rank: int) -> torch.Tensor:
    """[E] global expert -> local index on `ep_rank`, -1 where another rank owns it (vLLM's expert_map)."""
    E, ep = spec.num_experts, spec.parallel.ep_size
    El = E // ep
    e = torch.arange(E)
    if spec.parallel.expert_placement == "linear":
        owner, local = e // El, e % El
    else:
        owner, local = e % ep, e // ep
    return torch.where(owner == ep_rank, local, -1).to(torch.int32)


class MoERunner:
    """One MoE layer on one rank. Build with `MoERunner.load(artifact_dir, weights, device=...)`."""

    def __init__(self, root: Path, manifest: dict, module, weights: dict[str, torch.Tensor],
                 device: torch.device, *, tp_rank: int = 0, ep_rank: int = 0, reduce_results: bool = True,
                 process_group=None, shared_order: str = "before"):
        if shared_order not in SHARED_ORDERS:
            raise RunnerInputError(f"shared_order: {shared_order!r}; allowed: {' | '.join(SHARED_ORDERS)}")
        self.root, self.manifest, self.module, self.device = root, manifest, module, device
        # overlap: shared experts on a side CUDA stream while the routed kernels run (on the CPU: before)
        self.shared_order = shared_order
        self._side = torch.cuda.Stream(device) if shared_order == "overlap" and device.type == "cuda" else None
        self.spec = spec = spec_from_dict(manifest["spec"])
        self.tp_rank, self.ep_rank = tp_rank, ep_rank
        self.reduce_results, self.process_group = reduce_results, process_group
        self.dtype = getattr(torch, spec.dtype)
        self.paths = manifest["paths"]
        self._fns = {name: module[name] for name in manifest["functions"]}
        # the persistent grid of warp-specialised wgmma kernels: one block per multiprocessor
        self._n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        # Hx, the columns of x the up GEMMs (and fused decode kernels) take (their first argument): Hp, or with
        # hidden padding the routed width rounded up (build: spec.kernel_x_width; artifacts before session 7 took Hp)
        widths = {int(a[0]["shape"][1]) for f, a in manifest["functions"].items()
                  if f.startswith(("experts_up_", "experts_fused_"))}
        if len(widths) != 1:
            raise ArtifactError(f"the up GEMMs of {root} take x of {sorted(widths)} columns; one width expected")
        self._x_width = widths.pop()
        self._stage: dict[str, tuple[int, dict]] = {}  # path -> (token capacity, staging buffers)
        self._pack(weights)

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path, weights: dict[str, torch.Tensor], device="cpu", *, tp_rank: int = 0, ep_rank: int = 0,
             reduce_results: bool = True, process_group=None, shared_order: str = "before") -> "MoERunner":
        """Check the artifact (hashes, format, device) and the weights, then pack the weights once.

        `weights` follows the weights contract (moegen.spec.weights_contract) in vLLM layout, either full
        (every expert, the whole intermediate width: this rank keeps its TP/EP shard) or already cut to
        this rank's shard (w2_bias [El, Hr] is not cut by TP: only TP rank 0 adds it, either way). Optional
        `gate` [E, Hr] (+ `gate_bias` [E]) makes the runner compute the router logits itself. The caller's
        tensors are never modified.

        Parallel: `tp_rank`/`ep_rank` place this rank in the spec's TP x EP group (rank = ep_rank * tp +
        tp_rank in `process_group`); `reduce_results=False` leaves the all-reduce to the caller.
        `shared_order`: "before" runs the shared experts before the routed ones (the seed's NO_OVERLAP);
        "overlap" runs them on a side CUDA stream concurrently (MULTI_STREAM_OVERLAPPED).
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():  # tensors say cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        manifest, module = load_artifact(path, device)
        return cls(Path(path), manifest, module, weights, device, tp_rank=tp_rank, ep_rank=ep_rank,
                   reduce_results=reduce_results, process_group=process_group, shared_order=shared_order)

    def _check_weights(self, weights: dict[str, torch.Tensor]) -> bool:
        """Validate names, shapes and dtypes; return True when the weights are already this rank's shard."""
        spec = self.spec
        full = weights_contract(spec)
        shard = weights_contract(spec, sharded=True)
        allowed = set(full) | set(OPTIONAL_WEIGHTS)
        unknown = sorted(set(weights) - allowed)
        if unknown:
            raise RunnerInputError(f"weights: unknown names {unknown}; this spec takes {sorted(allowed)}")
        missing = sorted(set(full) - set(weights))
        if missing:
            raise RunnerInputError(f"weights: missing {missing} (required by the spec)")
        if "gate_bias" in weights and "gate" not in weights:
            raise RunnerInputError("weights: 'gate_bias' given without 'gate'")
        is_shard = None
        for name, t in weights.items():
            if not isinstance(t, torch.Tensor):
                raise RunnerInputError(f"weights[{name!r}]: expected a torch.Tensor, got {type(t).__name__}")
            if name in full:
                fshape, dt = full[name]
                sshape = shard[name][0]
            else:
                fshape, dt = OPTIONAL_WEIGHTS[name](spec)
                sshape = fshape
            if str(t.dtype).removeprefix("torch.") != dt:
                raise RunnerInputError(f"weights[{name!r}]: dtype {t.dtype}, expected torch.{dt}")
            shape = tuple(t.shape)
            if shape == fshape and shape == sshape:
                continue
            this = True if shape == sshape else False if shape == fshape else None
            if this is None:
                want = f"{fshape}" + (f" (full) or {sshape} (this rank's shard)" if sshape != fshape else "")
                raise RunnerInputError(f"weights[{name!r}]: shape {shape}, expected {want}")
            if is_shard is not None and this != is_shard:
                raise RunnerInputError(f"weights[{name!r}]: mixes full and sharded weights; give all of one kind")
            is_shard = this
        return bool(is_shard)

    def _shard(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keep this rank's experts (EP) and slice of the intermediate width (TP)."""
        spec = self.spec
        I, Il, tp = spec.intermediate_size, spec.local_intermediate, spec.parallel.tp_size
        out = dict(weights)
        if spec.parallel.ep_size > 1:
            emap = expert_map(spec, self.ep_rank)
            mine = torch.nonzero(emap >= 0).flatten()
            mine = mine[emap[mine].argsort()]  # local order
            for n in ("w13", "w2", "w13_bias", "w2_bias"):
                if n in out:
                    out[n] = out[n][mine]
        if tp > 1:
            r = self.tp_rank
            cols = slice(r * Il, (r + 1) * Il)

            def rows13(t):  # gate rows then up rows: take this rank's slice of each
                if not spec.gated:
                    return t[:, cols]
                return torch.cat([t[:, cols], t[:, I + r * Il: I + (r + 1) * Il]], 1)

            out["w13"] = rows13(out["w13"])
            out["w2"] = out["w2"][:, :, cols]
            if "w13_bias" in out:
                out["w13_bias"] = rows13(out["w13_bias"])
            if spec.shared_experts is not None:
                Is = spec.shared_experts.intermediate_size
                Isl = Is // tp
                sc = slice(r * Isl, (r + 1) * Isl)
                sw = out["shared_w13"]
                out["shared_w13"] = torch.cat([sw[sc], sw[Is + r * Isl: Is + (r + 1) * Isl]]) if spec.gated else sw[sc]
                out["shared_w2"] = out["shared_w2"][:, sc]
        return out

    def _pack(self, weights: dict[str, torch.Tensor]) -> None:
        spec, dev, dt = self.spec, self.device, self.dtype
        if not self._check_weights(weights):
            weights = self._shard(weights)
        if "w2_bias" in weights and spec.parallel.tp_size > 1 and self.tp_rank != 0:
            # added once, before the TP all-reduce, whether the runner or the caller cut the shard
            weights = dict(weights, w2_bias=torch.zeros_like(weights["w2_bias"]))
        El, Hr, Hp = spec.local_experts, spec.routed_width, spec.kernel_hidden
        pad = Hp - Hr
        layouts = [(p["config"]["block_n_up"], p["config"]["block_n_down"]) for p in self.paths]
        # one weight at a time, so the device holds at most one unpacked weight next to the packed ones
        # (popped from a copy of the dict: a shard cut above is freed once packed, the caller's dict kept)
        weights = dict(weights)
        w13 = weights.pop("w13").to(dev)  # [El, N13, Hp] after padding
        w13 = F.pad(w13, (0, pad)) if pad else w13
        N13 = w13.shape[1]
        w13p = {bn: self._pack_weight("w13", w13, bn) for bn in dict.fromkeys(up for up, _ in layouts)}
        del w13
        w2 = weights.pop("w2").to(dev)  # [El, Hp, I] after padding
        w2 = F.pad(w2, (0, 0, 0, pad)) if pad else w2
        w2p = {bn: self._pack_weight("w2", w2, bn) for bn in dict.fromkeys(down for _, down in layouts)}
        del w2
        b13 = weights["w13_bias"].to(dev) if spec.expert_bias else torch.zeros(El, N13, dtype=dt, device=dev)
        b2 = F.pad(weights["w2_bias"].to(dev), (0, pad)) if spec.expert_bias else torch.zeros(El, Hp, dtype=dt, device=dev)
        self._packed = {(up, down): (w13p[up], packing.pack_b13(b13, up, spec.gated), w2p[down],
                                     packing.pack_b2(b2, down)) for up, down in layouts}
        self.expert_map = expert_map(spec, self.ep_rank).to(dev)
        bias = weights.get("e_score_correction_bias")
        self.correction_bias = (bias.to(dev, torch.float32) if bias is not None
                                else torch.zeros(spec.num_experts, dtype=torch.float32, device=dev))
        # the router computes in fp32: convert the gate once here, not on every forward
        self.gate = weights["gate"].to(dev, torch.float32) if "gate" in weights else None
        self.gate_bias = weights["gate_bias"].to(dev, torch.float32) if "gate_bias" in weights else None
        self.latent_proj = weights["latent_proj"].to(dev) if spec.latent_size is not None else None
        if spec.shared_experts is not None:
            self.shared_w13 = weights["shared_w13"].to(dev)
            self.shared_w2 = weights["shared_w2"].to(dev)
            self.shared_gate = weights["shared_gate"].to(dev) if spec.shared_experts.gate == "sigmoid" else None

    def _pack_weight(self, which: str, w: torch.Tensor, block_n: int) -> torch.Tensor:
        """w13 [El, N13, Hp] | w2 [El, Hp, I] on the device -> its column tiles [El, NT, Hp | I, BN]: with
        the artifact's pack_{which}_n{BN} kernel when it has one (CUDA: near copy bandwidth), else with
        torch (artifacts built before the kernels, or from a schedule without `pack:`)."""
        fn = self._fns.get(f"pack_{which}_n{block_n}")
        if fn is None:
            return (packing.pack_w13(w, block_n, self.spec.gated) if which == "w13"
                    else packing.pack_w2(w, block_n))
        E, N, K = w.shape
        out = torch.empty(E, N // block_n, K, block_n, dtype=w.dtype, device=w.device)  # every element written
        with self._stream():
            fn(w.contiguous(), out)
        return out

    # ---- forward ---------------------------------------------------------------------------

    def _check_inputs(self, hidden_states, router_logits) -> None:
        spec = self.spec
        if not isinstance(hidden_states, torch.Tensor):
            raise RunnerInputError(f"hidden_states: expected a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 2 or hidden_states.shape[1] != spec.hidden_size:
            raise RunnerInputError(f"hidden_states: shape {tuple(hidden_states.shape)}, expected [T, {spec.hidden_size}]")
        if hidden_states.dtype != self.dtype:
            raise RunnerInputError(f"hidden_states: dtype {hidden_states.dtype}, expected {self.dtype}")
        if hidden_states.device != self.device:
            raise RunnerInputError(f"hidden_states: on {hidden_states.device}, the runner is on {self.device}")
        if router_logits is None:
            if self.gate is None:
                raise RunnerInputError("router_logits: None, but the runner holds no 'gate' weight to compute them")
            return
        if not isinstance(router_logits, torch.Tensor):
            raise RunnerInputError(f"router_logits: expected a torch.Tensor, got {type(router_logits).__name__}")
        T = hidden_states.shape[0]
        if tuple(router_logits.shape) != (T, spec.num_experts):
            raise RunnerInputError(f"router_logits: shape {tuple(router_logits.shape)}, expected [{T}, {spec.num_experts}]")
        if not router_logits.is_floating_point():
            raise RunnerInputError(f"router_logits: dtype {router_logits.dtype}, expected a floating dtype")
        if router_logits.device != self.device:
            raise RunnerInputError(f"router_logits: on {router_logits.device}, the runner is on {self.device}")

    def __call__(self, hidden_states: torch.Tensor, router_logits: torch.Tensor | None = None, *,
                 sp_sizes: list[int] | None = None):
        return self.forward(hidden_states, router_logits, sp_sizes=sp_sizes)

    def as_op(self, layer: str):
        """Register this runner as `layer` and return f(hidden, router_logits=None) that calls the torch
        custom op (torch.ops.moegen.moe_forward[_shared]): what a model calls under torch.compile."""
        from . import ops

        ops.register_layer(layer, self)
        op = ops.moe_forward_shared if self.spec.shared_experts is not None else ops.moe_forward
        return lambda hidden_states, router_logits=None: op(hidden_states, router_logits, layer)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor | None = None, *,
                sp_sizes: list[int] | None = None):
        """hidden_states [T, H] (spec dtype), router_logits [T, E] (any float dtype; None when the runner
        holds the gate). Returns routed [T, Hr], or (shared [T, H], routed [T, Hr]) with shared experts.

        Sequence parallel (spec.parallel.sequence_parallel, a group of tp*ep > 1 ranks): each rank passes
        its own tokens; `sp_sizes` lists every rank's token count (host ints, so nothing synchronises;
        default: all equal to this rank's). The runner gathers all tokens, computes this rank's experts
        (and TP slice) for them, and reduce-scatters the result back: no all-reduce of the output.
        """
        self._check_inputs(hidden_states, router_logits)
        spec = self.spec
        x = hidden_states.contiguous()
        if x.data_ptr() % INPUT_ALIGN_BYTES:  # a view that starts mid-vector: a fresh copy (a host check, no sync)
            x = x.clone()
        xr = F.linear(x, self.latent_proj) if self.latent_proj is not None else x  # [T, Hr]
        if self.gate is not None:  # the runner holds the gate: logits of the routed input, in fp32
            router_logits = F.linear(xr.float(), self.gate, self.gate_bias)
        logits = router_logits.to(torch.float32).contiguous()  # [T, E]
        sp = spec.parallel.sequence_parallel and self._group_size() > 1
        if sp:
            sizes = list(sp_sizes) if sp_sizes is not None else [x.shape[0]] * self._group_size()
            x, xr, logits = (self._sp_gather(t, sizes) for t in (x, xr, logits))
        Hr, Hx = spec.routed_width, self._x_width
        xp = F.pad(xr, (0, Hx - Hr)) if Hx != Hr else xr  # [T, Hx]
        if spec.shared_experts is None:
            shared, routed = None, self._routed(xp, logits)  # [T, Hp]
        elif self._side is None:  # NO_OVERLAP: shared experts first
            shared = self._shared(x)
            routed = self._routed(xp, logits)
        else:  # MULTI_STREAM_OVERLAPPED: fork to the side stream, join before the reduce
            main = torch.cuda.current_stream(self.device)
            self._side.wait_stream(main)
            with torch.cuda.stream(self._side):
                shared = self._shared(x)
            routed = self._routed(xp, logits)
            main.wait_stream(self._side)
            shared.record_stream(main)  # made on the side stream, used and freed on the main one
        outs = [routed] if shared is None else [shared, routed]
        outs = [self._sp_scatter(o, sizes) for o in outs] if sp else [self._maybe_reduce(o) for o in outs]
        outs[-1] = outs[-1][..., :Hr]  # truncation after the reduce, as the seed
        return outs[0] if shared is None else (outs[0], outs[1])

    # ---- parallel (TP/EP groups over torch.distributed) ------------------------------------------

    def _group_size(self) -> int:
        return self.spec.parallel.tp_size * self.spec.parallel.ep_size

    def _maybe_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce over the TP x EP group when results are to be reduced (the seed's
        _maybe_reduce_output); the caller reduces when reduce_results is False."""
        if self.reduce_results and self._group_size() > 1:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.process_group)
        return t

    def _sp_gather(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """[T_r, ...] on each rank -> [sum(sizes), ...] on all ranks (padded to the largest share)."""
        import torch.distributed as dist

        most = max(sizes)
        padded = F.pad(t, (0, 0, 0, most - t.shape[0])) if t.shape[0] < most else t
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=self.process_group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    def _sp_scatter(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Sum the ranks' partial outputs of all tokens and keep this rank's rows. NCCL reduce-scatters;
        gloo has no reduce-scatter, so there it all-reduces and slices (same result, more traffic)."""
        import torch.distributed as dist

        rank = dist.get_rank(self.process_group)
        start = sum(sizes[:rank])
        if dist.get_backend(self.process_group) == "nccl":
            most = max(sizes)
            chunks = torch.cat([F.pad(c, (0, 0, 0, most - c.shape[0])) for c in t.split(sizes)])
            mine = torch.empty(most, *t.shape[1:], dtype=t.dtype, device=t.device)
            dist.reduce_scatter_tensor(mine, chunks, group=self.process_group)
            return mine[:sizes[rank]]
        dist.all_reduce(t, group=self.process_group)
        return t[start:start + sizes[rank]]

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """The shared MLP on this rank's TP slice. Its weights are replicated across EP ranks, so only
        EP rank 0 contributes: the group's sum is then the shared output once."""
        if self.ep_rank != 0:
            return x.new_zeros(x.shape[0], self.spec.hidden_size)
        spec = self.spec  # the shared MLP is a dense layer: torch's GEMMs serve it, in the model dtype
        act = activation_ref(F.linear(x, self.shared_w13), spec.activation, spec.swiglu_alpha, spec.swiglu_limit)
        y = F.linear(act, self.shared_w2)  # [T, H]
        if self.shared_gate is not None:
            y = y * torch.sigmoid(F.linear(x, self.shared_gate))
        return y

    # ---- routed experts ------------------------------------------------------------------------

    def _routed(self, xp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """xp [T, Hx], logits [T, E] fp32 -> [T, Hp], in chunks of at most max_chunk_tokens tokens that
        reuse one set of staging buffers (fixed addresses for CUDA graphs)."""
        T, step = xp.shape[0], self.spec.max_chunk_tokens
        out = torch.empty(T, self.spec.kernel_hidden, dtype=self.dtype, device=self.device)
        for s in range(0, T, step):
            self._routed_chunk(xp[s:s + step], logits[s:s + step], out[s:s + step])
        return out

    def _staging(self, path: dict, T: int) -> dict[str, torch.Tensor]:
        """Views of this path's staging buffers for a chunk of T tokens. The buffers are allocated for
        the largest chunk seen (at most max_chunk_tokens) and reused by every later chunk and call."""
        spec, dev = self.spec, self.device
        K, El, Hp, I, BM = spec.top_k, spec.local_experts, spec.kernel_hidden, spec.local_intermediate, \
            path["config"]["block_m"]
        cap, bufs = self._stage.get(path["name"], (0, None))
        if T > cap:
            cap = min(max(T, 2 * cap), spec.max_chunk_tokens)
            mp = max_blocks(cap, K, El, BM) * BM  # (the sorted order's bound covers the unsorted one)
            i32 = dict(dtype=torch.int32, device=dev)
            bufs = dict(ids=torch.empty(cap * K, **i32), tw=torch.empty(cap * K, dtype=torch.float32, device=dev),
                        counts=torch.empty(El, **i32), offsets=torch.empty(El + 1, dtype=torch.int64, device=dev),
                        sorted_ids=torch.empty(mp, **i32), block_expert=torch.empty(mp // BM, **i32),
                        num_blocks=torch.empty(1, **i32), slot_pos=torch.empty(cap * K, **i32),
                        act=torch.empty(mp * I, dtype=self.dtype, device=dev),
                        y=torch.empty(mp * Hp, device=dev,
                                      dtype=self.dtype if path["config"].get("y_model_dtype") else torch.float32))
            if path["config"].get("fused"):  # the fused decode's fp32 sum and block counter: zero between forwards
                bufs["acc"] = torch.zeros(cap * Hp, dtype=torch.float32, device=dev)
                bufs["count"] = torch.zeros(1, **i32)
            if path["config"].get("dispatch_tile"):  # the multi-block dispatch's scratch
                bufs["tile_counts"] = torch.empty(tile_counts_size(cap, K, El, path["config"]["dispatch_tile"]), **i32)
            self._stage[path["name"]] = (cap, bufs)
        MB = max_blocks(T, K, El, BM, path["config"].get("sort", True))
        return dict(ids=bufs["ids"][:T * K].view(T, K), tw=bufs["tw"][:T * K].view(T, K), counts=bufs["counts"],
                    offsets=bufs["offsets"], sorted_ids=bufs["sorted_ids"][:MB * BM],
                    block_expert=bufs["block_expert"][:MB], num_blocks=bufs["num_blocks"],
                    slot_pos=bufs["slot_pos"][:T * K], act=bufs["act"][:MB * BM * I].view(MB * BM, I),
                    y=bufs["y"][:MB * BM * Hp].view(MB * BM, Hp),
                    tile_counts=bufs.get("tile_counts"), count=bufs.get("count"),
                    acc=bufs["acc"][:T * Hp].view(T, Hp) if "acc" in bufs else None)

    def _routed_chunk(self, xp: torch.Tensor, logits: torch.Tensor, out: torch.Tensor) -> None:
        """The kernels of one chunk: routing, the dispatch (one kernel, or three over tiles of slots; none
        without the sort, where routing writes its buffers), experts_up, experts_down, combine:
        xp [T, Hx], logits [T, E] fp32 -> out [T, Hp] (a view)."""
        spec = self.spec
        T = xp.shape[0]
        if T == 0:  # an empty batch launches nothing
            return
        path = pick_path(self.paths, T, spec.top_k, spec.local_experts)
        c = path["config"]
        w13, b13, w2, b2 = self._packed[(c["block_n_up"], c["block_n_down"])]
        b = self._staging(path, T)
        f, name = self._fns, path["name"]
        with self._stream():  # CUDA: kernels launch on torch's current stream (graph capture too)
            if c.get("fused_routing"):  # one kernel from the logits and x to the output
                f[f"experts_fused_{name}"](xp.contiguous(), logits.contiguous(), self.correction_bias, self.expert_map,
                                           w13, b13, w2, b2, b["acc"], b["count"], out)
                return
            if c.get("sort", True):
                f["routing"](logits.contiguous(), self.correction_bias, b["ids"], b["tw"])
                self._dispatch(path, b, self.expert_map)
            else:  # no sort: routing writes the dispatch buffers (slot s is block s)
                f[f"route_dispatch_{name}"](logits.contiguous(), self.correction_bias, self.expert_map, b["ids"],
                                            b["tw"], b["sorted_ids"], b["block_expert"], b["num_blocks"],
                                            b["slot_pos"])
            if c.get("fused"):  # one kernel to the output; it leaves acc and count zero
                f[f"experts_fused_{name}"](xp.contiguous(), b["tw"], b["block_expert"], w13, b13, w2, b2, b["acc"],
                                           b["count"], out)
                return
            grid = (self._n_sm,) if c.get("warp_specialized") else ()  # persistent kernels: their block count
            f[f"experts_up_{name}"](xp.contiguous(), b["tw"], b["sorted_ids"], b["block_expert"], b["num_blocks"],
                                    w13, b13, b["act"], *grid)
            f[f"experts_down_{name}"](b["act"], b["tw"], b["sorted_ids"], b["block_expert"], b["num_blocks"],
                                      w2, b2, b["y"], *grid)
            f[f"combine_{name}"](b["y"], b["slot_pos"], out)

    def _dispatch(self, path: dict, b: dict[str, torch.Tensor], emap: torch.Tensor) -> None:
        """The sort of a path: b["ids"] [T, K] (global experts) and emap [E] -> b's counts, offsets,
        sorted_ids, block_expert, num_blocks and slot_pos (reference.dispatch_ref's contract). One
        kernel, or with config.dispatch_tile three over tiles of slots (count, scan, place)."""
        c, f, name = path["config"], self._fns, path["name"]
        if not c.get("dispatch_tile"):
            f[f"dispatch_{name}"](b["ids"], emap, b["counts"], b["offsets"], b["sorted_ids"], b["block_expert"],
                                  b["num_blocks"], b["slot_pos"])
            return
        T, K = b["ids"].shape
        tiles = b["tile_counts"][:tile_counts_size(T, K, self.spec.local_experts, c["dispatch_tile"])]
        f[f"dispatch_count_{name}"](b["ids"], emap, tiles)
        f[f"dispatch_scan_{name}"](b["ids"], tiles, b["counts"], b["offsets"], b["sorted_ids"], b["block_expert"],
                                   b["num_blocks"])
        f[f"dispatch_place_{name}"](b["ids"], emap, tiles, b["offsets"], b["sorted_ids"], b["slot_pos"])

    def _stream(self):
        return tvm_ffi.use_torch_stream() if self.device.type == "cuda" else contextlib.nullcontext()
