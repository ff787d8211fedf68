"""The spec of one MoE layer: YAML -> frozen, validated dataclasses with a canonical hash.

Shape legend (used in every MoE file of moegen):
    T tokens, E experts (global), El experts on this rank, K top-k, H hidden, Hp padded hidden (kernel width),
    I intermediate per expert (I/tp on a rank), L latent width, Is shared-expert intermediate.

This module imports only the standard library (pyyaml lazily), so the runtime may use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

DTYPES = ("float32", "float16", "bfloat16")
ACTIVATIONS = ("silu", "gelu", "swigluoai", "relu2")
SCORINGS = ("softmax", "sigmoid")
SHARED_GATES = ("none", "sigmoid")
PLACEMENTS = ("linear", "round_robin")
QUANT_SCHEMES = ("none", "int8_w8a16", "int4_w4a16", "fp8_w8a8")
SUPPORTED_QUANT = ("none",)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # \Z: "$" would accept a trailing newline


class SpecError(ValueError):
    """One invalid field: names the field, the value and what is allowed, on one line."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field = field_name
        self.value = value
        self.allowed = allowed
        super().__init__(f"spec field '{field_name}': got {value!r}; allowed: {allowed}")


@dataclass(frozen=True)
class RouterSpec:
    scoring: str = "softmax"  # softmax | sigmoid over the E logits, in fp32
    renormalize: bool = True  # divide the K chosen weights by their sum
    num_expert_group: int | None = None  # grouped top-k (DeepSeek): experts split into this many groups
    topk_group: int | None = None  # ... of which this many groups are kept
    correction_bias: bool = False  # e_score_correction_bias: added to scores to choose, not to weigh
    routed_scaling_factor: float = 1.0  # multiplies the final routing weights
    apply_weight_on_input: bool = False  # Llama-4: scale the expert input, not the output (needs K == 1)

    @property
    def grouped(self) -> bool:
        return self.num_expert_group is not None


@dataclass(frozen=True)
class SharedExpertsSpec:
    intermediate_size: int  # Is: the shared MLP's intermediate width (all shared experts fused)
    gate: str = "none"  # none | sigmoid (Qwen2-MoE's shared_expert_gate: out *= sigmoid(x @ g.T))


@dataclass(frozen=True)
class QuantSpec:
    scheme: str = "none"
    group_size: int | None = None  # int4_w4a16
    zero_points: bool = False  # int4_w4a16
    granularity: str | None = None  # fp8_w8a8: per-tensor | per-channel | block
    block: tuple[int, int] | None = None  # fp8_w8a8 block scales, e.g. (128, 128)


@dataclass(frozen=True)
class ParallelSpec:
    tp_size: int = 1  # each rank holds I/tp of every expert
    ep_size: int = 1  # each rank owns E/ep experts
    expert_placement: str = "linear"  # linear: rank r owns [r*El, (r+1)*El); round_robin: e % ep == r
    sequence_parallel: bool = False  # tokens split across ranks; no all-reduce of the output


# the reduction step of the tensor-core up GEMMs (wgmma's BK; mma.sync's block_k fits to a divisor of it):
# the width Hx of x they read is a multiple of it (MoESpec.kernel_x_width)
X_STEP = 64


@dataclass(frozen=True)
class PaddingSpec:
    hidden_multiple: int = 1  # kernels see the routed width rounded up to this


@dataclass(frozen=True)
class MoESpec:
    name: str
    dtype: str  # activations and weights: float32 | float16 | bfloat16
    hidden_size: int  # H
    intermediate_size: int  # I, per expert (before TP)
    num_experts: int  # E
    top_k: int  # K
    activation: str = "silu"
    swiglu_alpha: float = 1.702  # swigluoai only
    swiglu_limit: float = 7.0  # swigluoai only
    expert_bias: bool = False  # w13_bias [E, 2I] and w2_bias [E, H]
    router: RouterSpec = field(default_factory=RouterSpec)
    shared_experts: SharedExpertsSpec | None = None
    latent_size: int | None = None  # L: routed experts see [T, L] after latent_proj
    quant: QuantSpec = field(default_factory=QuantSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    padding: PaddingSpec = field(default_factory=PaddingSpec)
    max_chunk_tokens: int = 32768

    # ---- derived widths ---------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.activation != "relu2"

    @property
    def routed_width(self) -> int:
        """Width the routed experts see before padding: L with a latent transform, else H."""
        return self.latent_size if self.latent_size is not None else self.hidden_size

    @property
    def kernel_hidden(self) -> int:
        """Hp: the routed width rounded up to padding.hidden_multiple."""
        m = self.padding.hidden_multiple
        return -(-self.routed_width // m) * m

    @property
    def kernel_x_width(self) -> int:
        """Hx: the columns of x the up GEMMs read, the routed width rounded up to X_STEP (at most Hp).
        w13's columns past Hr are zeros, so the reduction stops at Hx and the runner pads x to Hx only:
        gpt-oss-20b's 2880 of Hp 3072 need no pad at all."""
        return min(self.kernel_hidden, -(-self.routed_width // X_STEP) * X_STEP)

    @property
    def local_intermediate(self) -> int:
        return self.intermediate_size // self.parallel.tp_size

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.parallel.ep_size

    @property
    def w13_rows(self) -> int:
        """Rows of w13 per expert on one rank: gate rows then up rows when gated."""
        return (2 if self.gated else 1) * self.local_intermediate

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["quant"]["block"] is not None:
            d["quant"]["block"] = list(d["quant"]["block"])
        return d

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]


# ---- validation ------------------------------------------------------------------------------

def _take(d: Mapping, allowed: tuple[str, ...], prefix: str) -> None:
    for k in d:
        if k not in allowed:
            raise SpecError(f"{prefix}{k}", d[k], "one of the fields " + ", ".join(allowed))


def _int(d: Mapping, key: str, prefix: str, default: Any = ..., minimum: int = 1) -> Any:
    if key not in d or d[key] is None:
        if default is ...:
            raise SpecError(prefix + key, None, f"an integer >= {minimum} (required)")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise SpecError(prefix + key, v, f"an integer >= {minimum}")
    return v


def _bool(d: Mapping, key: str, prefix: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise SpecError(prefix + key, v, "true | false")
    return v


def _choice(d: Mapping, key: str, prefix: str, choices: tuple[str, ...], default: str) -> str:
    v = d.get(key, default)
    if v not in choices:
        raise SpecError(prefix + key, v, " | ".join(choices))
    return v


def _float(d: Mapping, key: str, prefix: str, default: float, positive: bool = True) -> float:
    import math

    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and not v > 0):
        raise SpecError(prefix + key, v, "a finite number > 0" if positive else "a finite number")
    return float(v)


def _section(d: Mapping, key: str) -> Mapping:
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise SpecError(key, v, "a mapping of fields")
    return v


def parse_spec(data: Any) -> MoESpec:
    """Validate a mapping (parsed YAML) into a MoESpec; raise SpecError on the first bad field."""
    if not isinstance(data, Mapping):
        raise SpecError("<root>", data, "a mapping of spec fields")
    top = ("name", "dtype", "hidden_size", "intermediate_size", "num_experts", "top_k", "activation",
           "swiglu_alpha", "swiglu_limit", "expert_bias", "router", "shared_experts", "latent_size", "quant",
           "parallel", "padding", "max_chunk_tokens")
    _take(data, top, "")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError("name", name, "a non-empty name of letters, digits, '.', '_', '-'")
    dtype = _choice(data, "dtype", "", DTYPES, "bfloat16")
    H = _int(data, "hidden_size", "")
    I = _int(data, "intermediate_size", "")
    E = _int(data, "num_experts", "")
    K = _int(data, "top_k", "")
    if K > E:
        raise SpecError("top_k", K, f"an integer in 1..num_experts ({E})")
    act = _choice(data, "activation", "", ACTIVATIONS, "silu")
    alpha = _float(data, "swiglu_alpha", "", 1.702)
    limit = _float(data, "swiglu_limit", "", 7.0)
    ebias = _bool(data, "expert_bias", "", False)

    r = _section(data, "router")
    _take(r, tuple(f.name for f in dataclasses.fields(RouterSpec)), "router.")
    G = _int(r, "num_expert_group", "router.", None)
    TG = _int(r, "topk_group", "router.", None)
    if (G is None) != (TG is None):
        missing = "router.topk_group" if TG is None else "router.num_expert_group"
        raise SpecError(missing, None, "set together with the other grouped top-k field")
    if G is not None:
        if E % G:
            raise SpecError("router.num_expert_group", G, f"a divisor of num_experts ({E})")
        if TG > G:
            raise SpecError("router.topk_group", TG, f"an integer in 1..num_expert_group ({G})")
        if K > TG * (E // G):
            raise SpecError("top_k", K, f"at most topk_group * experts per group ({TG * (E // G)})")
    router = RouterSpec(
        scoring=_choice(r, "scoring", "router.", SCORINGS, "softmax"),
        renormalize=_bool(r, "renormalize", "router.", True),
        num_expert_group=G,
        topk_group=TG,
        correction_bias=_bool(r, "correction_bias", "router.", False),
        routed_scaling_factor=_float(r, "routed_scaling_factor", "router.", 1.0),
        apply_weight_on_input=_bool(r, "apply_weight_on_input", "router.", False),
    )
    if router.apply_weight_on_input and K != 1:
        raise SpecError("router.apply_weight_on_input", True, "true only with top_k == 1 (as vLLM)")

    shared = None
    if data.get("shared_experts") is not None:
        s = _section(data, "shared_experts")
        _take(s, ("intermediate_size", "gate"), "shared_experts.")
        shared = SharedExpertsSpec(
            intermediate_size=_int(s, "intermediate_size", "shared_experts."),
            gate=_choice(s, "gate", "shared_experts.", SHARED_GATES, "none"),
        )
    latent = _int(data, "latent_size", "", None)

    q = _section(data, "quant")
    _take(q, ("scheme", "group_size", "zero_points", "granularity", "block"), "quant.")
    scheme = _choice(q, "scheme", "quant.", QUANT_SCHEMES, "none")
    if scheme == "none":
        for k in ("group_size", "granularity", "block", "zero_points"):
            if q.get(k) not in (None, False):
                raise SpecError(f"quant.{k}", q[k], "unset with quant.scheme none (it has no effect there)")
    if scheme not in SUPPORTED_QUANT:
        raise SpecError("quant.scheme", scheme, " | ".join(SUPPORTED_QUANT) + f" ({scheme} is not yet supported)")
    quant = QuantSpec(scheme=scheme)

    p = _section(data, "parallel")
    _take(p, tuple(f.name for f in dataclasses.fields(ParallelSpec)), "parallel.")
    tp = _int(p, "tp_size", "parallel.", 1)
    ep = _int(p, "ep_size", "parallel.", 1)
    if I % tp:
        raise SpecError("parallel.tp_size", tp, f"a divisor of intermediate_size ({I})")
    if shared is not None and shared.intermediate_size % tp:
        raise SpecError("parallel.tp_size", tp, f"a divisor of shared_experts.intermediate_size "
                                                 f"({shared.intermediate_size})")
    if E % ep:
        raise SpecError("parallel.ep_size", ep, f"a divisor of num_experts ({E})")
    parallel = ParallelSpec(
        tp_size=tp, ep_size=ep,
        expert_placement=_choice(p, "expert_placement", "parallel.", PLACEMENTS, "linear"),
        sequence_parallel=_bool(p, "sequence_parallel", "parallel.", False),
    )
    pad = _section(data, "padding")
    _take(pad, ("hidden_multiple",), "padding.")
    padding = PaddingSpec(hidden_multiple=_int(pad, "hidden_multiple", "padding.", 1))
    return MoESpec(
        name=name, dtype=dtype, hidden_size=H, intermediate_size=I, num_experts=E, top_k=K,
        activation=act, swiglu_alpha=alpha, swiglu_limit=limit, expert_bias=ebias, router=router,
        shared_experts=shared, latent_size=latent, quant=quant, parallel=parallel, padding=padding,
        max_chunk_tokens=_int(data, "max_chunk_tokens", "", 32768),
    )


def load_spec(path) -> MoESpec:
    """Read and validate a YAML spec file."""
    import yaml  # build side only: the runtime reads specs from manifest JSON

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise SpecError("<file>", str(path), f"a readable YAML file ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SpecError("<file>", str(path), f"valid YAML ({str(e).splitlines()[0]})") from None
    return parse_spec(data)


def spec_from_dict(d: Mapping) -> MoESpec:
    """Rebuild a spec from `MoESpec.to_dict()` output (the manifest stores that)."""
    return parse_spec(_strip_defaults(d))


def _strip_defaults(d: Mapping) -> dict:
    out = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, Mapping):
            v = {kk: vv for kk, vv in v.items() if vv is not None}
            if k == "quant":
                v = {"scheme": v["scheme"]}
        out[k] = v
    return out


# ---- the weights contract --------------------------------------------------------------------

def weights_contract(spec: MoESpec, *, sharded: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names -> (shape, dtype) of the weights a runner takes (vLLM layout), all in spec.dtype.

    `sharded=False` gives the full (all-rank) shapes; `sharded=True` the shapes one rank keeps.
    Required: w13 [E, 2I, Hr] (gate rows then up rows; [E, I, Hr] for relu2) and w2 [E, Hr, I], where
    Hr is the routed width (L with a latent transform). Optional names are listed with the flag that
    makes them required.
    """
    E = spec.local_experts if sharded else spec.num_experts
    I = spec.local_intermediate if sharded else spec.intermediate_size
    Hr, H = spec.routed_width, spec.hidden_size
    rows = (2 if spec.gated else 1) * I
    dt = spec.dtype
    c: dict[str, tuple[tuple[int, ...], str]] = {"w13": ((E, rows, Hr), dt), "w2": ((E, Hr, I), dt)}
    if spec.expert_bias:
        c["w13_bias"] = ((E, rows), dt)
        c["w2_bias"] = ((E, Hr), dt)
    if spec.router.correction_bias:
        c["e_score_correction_bias"] = ((spec.num_experts,), "float32")
    if spec.latent_size is not None:
        c["latent_proj"] = ((spec.latent_size, H), dt)
    if spec.shared_experts is not None:
        Is = spec.shared_experts.intermediate_size // (spec.parallel.tp_size if sharded else 1)
        c["shared_w13"] = ((2 * Is if spec.gated else Is, H), dt)
        c["shared_w2"] = ((H, Is), dt)
        if spec.shared_experts.gate == "sigmoid":
            c["shared_gate"] = ((1, H), dt)
    return c


OPTIONAL_WEIGHTS = {
    # internal router (ReplicatedLinear), applied to the routed input as the seed does (after the
    # routed-input transform): [E, Hr]
    "gate": lambda s: ((s.num_experts, s.routed_width), s.dtype),
    "gate_bias": lambda s: ((s.num_experts,), s.dtype),  # gpt-oss router bias
}


def shape_key(local_experts: int, top_k: int, hidden: int, intermediate: int) -> str:
    """The name of a layer shape's own schedules file, e<El>-k<K>-h<Hp>-i<I>: the widths the expert kernels
    see (dtype and router options do not change which tiles are fastest). torch-free, TVM-free: the GPU
    box's `moegen tune run` prints it."""
    return f"e{local_experts}-k{top_k}-h{hidden}-i{intermediate}"
