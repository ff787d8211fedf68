"""moegen/reference.py against an independent formulation written here.

The twin formulation: routing per token with Python floats (float64) and sorting, grouped top-k by explicit
loops over groups; the layer computed densely (every expert on every token, then weighted by a dense [T, E]
routing matrix) in float64; dispatch invariants checked slot by slot.

Shape legend: T tokens, E experts, El local experts, K top-k, H hidden, Hr routed width (L or H), Hp padded
hidden, I intermediate, L latent, Is shared intermediate, BM rows per block, MB max blocks, MP = MB * BM.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from moegen.reference import (
    activation_ref,
    dispatch_ref,
    expert_map_ref,
    experts_down_ref,
    experts_fused_ref,
    experts_up_ref,
    max_blocks,
    mlp_ref,
    moe_ref,
    random_weights,
    route_ref,
)
from moegen.spec import OPTIONAL_WEIGHTS, RouterSpec, parse_spec, weights_contract

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5}  # relative norm error vs the float64 twin (fp32 compute)
TOKENS = (1, 3, 17, 129)
POISON = 1e4  # finite, so that poison * 0 stays 0: padding multiplied by zero inputs must not matter


def make_spec(**kw):
    """A float32 spec with small odd sizes; dotted keys via nested dicts."""
    d = {"name": "t", "dtype": "float32", "hidden_size": 40, "intermediate_size": 24, "num_experts": 8, "top_k": 2}
    d.update(kw)
    return parse_spec(d)


def assert_close(actual, expected, rtol=1e-5):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all()
    if e.numel() == 0:
        return
    assert e.norm() > 0, "degenerate comparison: expected is all zeros"
    err = ((a - e).norm() / e.norm()).item()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"
    # and elementwise, so one wrong row among many cannot hide in the norm
    scale = e.abs().max().item()
    worst = (a - e).abs().max().item()
    assert worst <= 20 * rtol * scale, f"max abs error {worst:.3g} vs scale {scale:.3g}"


# ---- the independent routing -------------------------------------------------------------------------


def _scores_row(row, scoring):
    if scoring == "softmax":
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        s = sum(ex)
        return [v / s for v in ex]
    return [1.0 / (1.0 + math.exp(-v)) for v in row]


def _route_row(row, K, router, bias, group_rule=None):
    """One token: (chosen ids in descending choice order, weights, choice values, group scores)."""
    E = len(row)
    scores = _scores_row(row, router.scoring)
    choice = [scores[e] + bias[e] for e in range(E)] if bias is not None else list(scores)
    candidates = list(range(E))
    gscores = []
    if router.num_expert_group is not None:
        G, n = router.num_expert_group, E // router.num_expert_group
        rule = group_rule or ("top2" if bias is not None else "max")
        for g in range(G):
            members = sorted(choice[g * n:(g + 1) * n], reverse=True)
            gscores.append(sum(members[:2]) if rule == "top2" else members[0])
        kept = sorted(range(G), key=lambda g: gscores[g], reverse=True)[:router.topk_group]
        candidates = [e for e in range(E) if e // n in kept]
    chosen = sorted(candidates, key=lambda e: choice[e], reverse=True)[:K]
    w = [scores[e] for e in chosen]  # unbiased scores
    if router.renormalize:
        total = sum(w)
        w = [v / total for v in w]
    w = [v * router.routed_scaling_factor for v in w]
    return chosen, w, choice, gscores


def route_loops(logits, router, K, bias=None, group_rule=None):
    """logits [T, E] -> (ids [T, K] int64, weights [T, K] float64)."""
    b = bias.double().tolist() if (bias is not None and router.correction_bias) else None
    ids, ws = [], []
    for row in logits.double().tolist():
        chosen, w, _, _ = _route_row(row, K, router, b, group_rule)
        ids.append(chosen)
        ws.append(w)
    T = logits.shape[0]
    return (torch.tensor(ids, dtype=torch.int64).reshape(T, K),
            torch.tensor(ws, dtype=torch.float64).reshape(T, K))


def _spread(vals, abs_tol=1e-5, rel_tol=1e-4):
    s = sorted(vals)
    return all(b - a > abs_tol + rel_tol * max(abs(a), abs(b)) for a, b in zip(s, s[1:]))


def row_tie_free(row, router, bias):
    """Orders that fp32 rounding could flip are well apart: the logits (scores are monotone in them),
    and with a correction bias the biased choice values and group scores too."""
    if not _spread(row, 1e-4, 1e-4):
        return False
    if bias is None or not router.correction_bias:
        return True
    _, _, choice, gscores = _route_row(row, 1, router, bias.double().tolist())
    return _spread(choice) and _spread(gscores)


def tie_free_logits(T, E, gen, router, bias=None, scale=2.0):
    """[T, E] fp32 logits whose choice values and group scores are well separated (resampled per row)."""
    rows = []
    for _ in range(T):
        for _ in range(1000):
            r = (torch.randn(E, generator=gen) * scale).float()
            if row_tie_free(r.double().tolist(), router, bias):
                break
        else:
            raise AssertionError("could not draw a tie-free row")
        rows.append(r)
    return torch.stack(rows) if rows else torch.zeros(0, E)


def dense_routing(ids, w, E):
    """ids, w [T, K] -> R [T, E] float64 weights and M [T, E] bool selection, by explicit loops."""
    T, K = ids.shape
    R = torch.zeros(T, E, dtype=torch.float64)
    M = torch.zeros(T, E, dtype=torch.bool)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            assert not M[t, e], "an expert chosen twice for one token"
            R[t, e] = w[t, k]
            M[t, e] = True
    return R, M


# ---- the independent layer ----------------------------------------------------------------------------


def act_twin(h, name, alpha=1.702, limit=7.0):
    """float64, explicit formulas: gated ones split [gate | up] halves."""
    if name == "relu2":
        r = torch.where(h > 0, h, torch.zeros_like(h))
        return r * r
    n = h.shape[-1] // 2
    g, u = h[..., :n], h[..., n:]
    if name == "silu":
        return g / (1 + torch.exp(-g)) * u
    if name == "gelu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2.0))) * u
    if name == "swigluoai":
        g = torch.where(g > limit, torch.full_like(g, limit), g)
        u = torch.where(u > limit, torch.full_like(u, limit), torch.where(u < -limit, torch.full_like(u, -limit), u))
        return (u + 1) * g / (1 + torch.exp(-alpha * g))
    raise AssertionError(name)


def dense_layer(spec, W, x, logits=None, pre_acts=None):
    """Every expert on every token, combined through the dense routing matrix. Returns like moe_ref."""
    f = {k: v.double() for k, v in W.items()}
    x = x.double()
    xr = x @ f["latent_proj"].T if spec.latent_size is not None else x  # [T, Hr]
    if "gate" in f:
        logits = xr @ f["gate"].T + (f["gate_bias"] if "gate_bias" in f else 0)
    ids, w = route_loops(logits, spec.router, spec.top_k, W.get("e_score_correction_bias"))
    R, M = dense_routing(ids, w, spec.num_experts)  # [T, E]
    T = x.shape[0]
    out = torch.zeros(T, spec.routed_width, dtype=torch.float64)
    for e in range(spec.num_experts):
        xin = xr * R[:, e:e + 1] if spec.router.apply_weight_on_input else xr
        h = xin @ f["w13"][e].T
        if spec.expert_bias:
            h = h + f["w13_bias"][e]
        if pre_acts is not None:
            pre_acts.append(h[M[:, e]])
        y = act_twin(h, spec.activation, spec.swiglu_alpha, spec.swiglu_limit) @ f["w2"][e].T
        if spec.expert_bias:
            y = y + f["w2_bias"][e]
        out += M[:, e:e + 1] * y if spec.router.apply_weight_on_input else R[:, e:e + 1] * y
    if spec.shared_experts is None:
        return out
    sh = act_twin(x @ f["shared_w13"].T, spec.activation, spec.swiglu_alpha, spec.swiglu_limit) @ f["shared_w2"].T
    if spec.shared_experts.gate == "sigmoid":
        sh = sh / (1 + torch.exp(-(x @ f["shared_gate"].T)))
    return sh, out


def make_inputs(spec, W, T, seed):
    """x [T, H] (and logits [T, E] when W holds no gate), tie-free for the router in float64."""
    gen = torch.Generator().manual_seed(seed)
    bias = W.get("e_score_correction_bias")
    dt = getattr(torch, spec.dtype)
    if "gate" not in W:
        x = torch.randn(T, spec.hidden_size, generator=gen).to(dt)
        return x, tie_free_logits(T, spec.num_experts, gen, spec.router, bias)
    rows = []
    for _ in range(T):
        for _ in range(1000):
            xt = torch.randn(1, spec.hidden_size, generator=gen).to(dt)
            xr = xt.double() @ W["latent_proj"].double().T if spec.latent_size is not None else xt.double()
            lg = xr @ W["gate"].double().T + (W["gate_bias"].double() if "gate_bias" in W else 0)
            if row_tie_free(lg[0].tolist(), spec.router, bias):
                break
        else:
            raise AssertionError("could not draw a tie-free token")
        rows.append(xt)
    return torch.cat(rows), None


# ---- activations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["silu", "gelu", "swigluoai", "relu2"])
def test_activation_ref(name):
    g = torch.linspace(-12, 12, 241, dtype=torch.float64)
    u = torch.linspace(9, -9, 241, dtype=torch.float64)  # crosses +-limit too
    h = g[:, None] if name == "relu2" else torch.stack([g, u], 1)  # [N, 2] = gate | up
    alpha, limit = (1.3, 2.5) if name == "swigluoai" else (1.702, 7.0)
    got = activation_ref(h.float(), name, alpha, limit)
    want = act_twin(h, name, alpha, limit)
    assert got.shape == want.shape == (241, 1)
    assert (got.double() - want).abs().max() <= 1e-5 * (1 + want.abs().max())
    if name == "swigluoai":
        assert (g > limit).any() and (u < -limit).any() and (u > limit).any()


def test_gelu_is_the_erf_form():
    g = torch.tensor([[-1.5, 1.0], [0.7, 1.0], [2.2, 1.0]])
    erf = act_twin(g.double(), "gelu")
    tanh = (torch.nn.functional.gelu(g[:, :1], approximate="tanh") * g[:, 1:]).double()
    assert (erf - tanh).abs().max() > 1e-5  # the two forms are distinguishable here
    assert (activation_ref(g, "gelu").double() - erf).abs().max() < 1e-6


# ---- routing -----------------------------------------------------------------------------------------------

ROUTERS = {
    "softmax-renorm": (8, 2, RouterSpec()),
    "softmax-raw": (8, 2, RouterSpec(renormalize=False)),
    "softmax-k1": (6, 1, RouterSpec(renormalize=False)),
    "softmax-scaled": (16, 4, RouterSpec(routed_scaling_factor=2.5)),
    "sigmoid-renorm": (8, 2, RouterSpec(scoring="sigmoid")),
    "sigmoid-raw-scaled": (16, 3, RouterSpec(scoring="sigmoid", renormalize=False, routed_scaling_factor=1.7)),
    "softmax-bias": (8, 2, RouterSpec(correction_bias=True)),
    "sigmoid-bias": (16, 4, RouterSpec(scoring="sigmoid", correction_bias=True)),
    "grouped-softmax": (16, 4, RouterSpec(num_expert_group=4, topk_group=2)),
    "grouped-sigmoid-raw": (6, 2, RouterSpec(scoring="sigmoid", renormalize=False, num_expert_group=3,
                                             topk_group=1)),
    "grouped-bias-deepseek": (16, 4, RouterSpec(scoring="sigmoid", num_expert_group=4, topk_group=2,
                                                correction_bias=True, routed_scaling_factor=2.5)),
    "grouped-bias-softmax": (8, 3, RouterSpec(num_expert_group=4, topk_group=3, correction_bias=True,
                                              renormalize=False)),
    "grouped-bias-one-per-group": (8, 3, RouterSpec(scoring="sigmoid", num_expert_group=8, topk_group=3,
                                                    correction_bias=True)),
}


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("name", list(ROUTERS))
def test_route_ref_matches_loops(name, T):
    E, K, router = ROUTERS[name]
    gen = torch.Generator().manual_seed(1000 * T + len(name))
    bias = (torch.randn(E, generator=gen) * 0.2).float() if router.correction_bias else None
    logits = tie_free_logits(T, E, gen, router, bias)
    ids, w = route_ref(logits, router, K, bias)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == w.shape == (T, K)
    want_ids, want_w = route_loops(logits, router, K, bias)
    assert torch.equal(ids.long(), want_ids)
    assert_close(w, want_w)
    if router.renormalize:
        assert torch.allclose(w.double().sum(-1), torch.full((T,), router.routed_scaling_factor, dtype=torch.float64))


def test_route_ref_logits_in_low_precision_computes_in_fp32():
    router = RouterSpec(scoring="sigmoid", renormalize=False)
    gen = torch.Generator().manual_seed(5)
    logits = tie_free_logits(17, 8, gen, router).to(torch.bfloat16)
    ids, w = route_ref(logits, router, 2)
    want_ids, want_w = route_loops(logits.float(), router, 2)
    assert w.dtype == torch.float32
    assert torch.equal(ids.long(), want_ids)
    assert_close(w, want_w)


@pytest.mark.parametrize("grouped", [False, True])
def test_correction_bias_changes_selection_not_weights(grouped):
    E, K, T = 16, 2, 64
    kw = dict(num_expert_group=4, topk_group=2) if grouped else {}
    router = RouterSpec(scoring="sigmoid", correction_bias=True, **kw)
    plain = RouterSpec(scoring="sigmoid", **kw)
    gen = torch.Generator().manual_seed(7)
    bias = torch.zeros(E)
    bias[5] = 0.6  # a strong push for one expert
    bias[12] = -0.3
    logits = tie_free_logits(T, E, gen, router, bias)
    ids, w = route_ref(logits, router, K, bias)
    ids0, w0 = route_ref(logits, plain, K, bias)  # the flag off: the bias tensor is ignored
    want_ids, want_w = route_loops(logits, router, K, bias)
    assert torch.equal(ids.long(), want_ids)
    assert_close(w, want_w)
    changed = (ids.sort(-1).values != ids0.sort(-1).values).any(-1)
    assert changed.any(), "the bias never changed the selection: the test would not notice it being ignored"
    assert (ids == 5).any(-1).float().mean() > (ids0 == 5).any(-1).float().mean()
    # weights are the unbiased scores of the chosen experts, renormalized
    s = torch.sigmoid(logits.double()).gather(1, ids.long())
    assert_close(w, s / s.sum(-1, keepdim=True))


def test_grouped_bias_uses_top2_group_score():
    """DeepSeek-V3 ranks groups by the sum of their two best biased scores; the data here tells that rule
    apart from ranking by the best one (so a reference using max would fail)."""
    E, K, T = 16, 4, 129
    router = RouterSpec(scoring="sigmoid", num_expert_group=4, topk_group=2, correction_bias=True)
    gen = torch.Generator().manual_seed(11)
    bias = (torch.randn(E, generator=gen) * 0.2).float()
    logits = tie_free_logits(T, E, gen, router, bias)
    by_max, _ = route_loops(logits, router, K, bias, group_rule="max")
    want, _ = route_loops(logits, router, K, bias)
    assert not torch.equal(by_max, want), "data does not distinguish the two group rules"
    ids, _ = route_ref(logits, router, K, bias)
    assert torch.equal(ids.long(), want)


def test_grouped_selection_stays_in_kept_groups():
    E, K, T, G, TG = 16, 4, 129, 4, 2
    router = RouterSpec(num_expert_group=G, topk_group=TG)
    gen = torch.Generator().manual_seed(13)
    logits = tie_free_logits(T, E, gen, router)
    ids, _ = route_ref(logits, router, K)
    flat, _ = route_ref(logits, RouterSpec(), K)
    for t in range(T):
        groups = {int(e) // (E // G) for e in ids[t]}
        assert len(groups) <= TG
        gmax = logits[t].view(G, -1).max(-1).values
        assert groups <= set(gmax.topk(TG).indices.tolist())
    assert not torch.equal(ids, flat), "grouping never mattered on this data"


# ---- dispatch ----------------------------------------------------------------------------------------------


def random_ids(T, E, K, gen):
    """[T, K] int32, distinct experts per token."""
    if T == 0:
        return torch.zeros(0, K, dtype=torch.int32)
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(torch.int32)


DISPATCH = [  # (E, K, ep, placement, rank)
    (8, 2, 1, "linear", 0),
    (6, 3, 1, "linear", 0),
    (16, 4, 4, "linear", 1),
    (16, 4, 4, "round_robin", 3),
    (6, 2, 2, "round_robin", 0),
    (8, 1, 8, "linear", 5),
]


def check_dispatch(ids, emap, El, bm):
    T, K = ids.shape
    S = T * K
    d = dispatch_ref(ids, emap, El, bm)
    MB = -(-S // bm) + El
    assert max_blocks(T, K, El, bm) == MB
    assert d["counts"].dtype == torch.int32 and d["counts"].shape == (El,)
    assert d["offsets"].dtype == torch.int64 and d["offsets"].shape == (El + 1,)
    assert d["sorted_ids"].dtype == torch.int32 and d["sorted_ids"].shape == (MB * bm,)
    assert d["block_expert"].dtype == torch.int32 and d["block_expert"].shape == (MB,)
    assert d["num_blocks"].dtype == torch.int32 and d["num_blocks"].shape == (1,)
    assert d["slot_pos"].dtype == torch.int32 and d["slot_pos"].shape == (S,)

    local_of = [int(emap[int(g)]) for g in ids.reshape(-1)]  # per slot t*K+k
    counts = d["counts"].tolist()
    offsets = d["offsets"].tolist()
    sorted_ids = d["sorted_ids"].tolist()
    slot_pos = d["slot_pos"].tolist()
    block_expert = d["block_expert"].tolist()
    nb = int(d["num_blocks"][0])

    assert counts == [sum(1 for le in local_of if le == e) for e in range(El)]
    assert offsets[0] == 0
    for e in range(El):
        assert offsets[e + 1] - offsets[e] == -(-counts[e] // bm) * bm
        seg = sorted_ids[offsets[e]:offsets[e + 1]]
        want = [s for s in range(S) if local_of[s] == e]  # ascending slot order
        assert seg[:counts[e]] == want
        assert all(v == S for v in seg[counts[e]:]), "padding inside a segment must hold the sentinel T*K"
    assert all(v == S for v in sorted_ids[offsets[-1]:])
    # every local slot exactly once, non-local never
    seen = Counter(v for v in sorted_ids if v != S)
    local_slots = {s for s in range(S) if local_of[s] >= 0}
    assert set(seen) == local_slots and all(c == 1 for c in seen.values())
    # slot_pos and sorted_ids are inverse on local slots
    for s in range(S):
        if local_of[s] < 0:
            assert slot_pos[s] == -1
        else:
            assert sorted_ids[slot_pos[s]] == s
    for r, v in enumerate(sorted_ids):
        if v != S:
            assert slot_pos[v] == r
    # blocks
    assert nb * bm == offsets[-1] and nb <= MB
    for b in range(MB):
        if b >= nb:
            assert block_expert[b] == -1
            continue
        e = block_expert[b]
        assert 0 <= e < El and offsets[e] <= b * bm < offsets[e + 1]
        for v in sorted_ids[b * bm:(b + 1) * bm]:
            assert v == S or local_of[v] == e
    return d, local_of


@pytest.mark.parametrize("bm", [1, 4, 16])
@pytest.mark.parametrize("T", (0,) + TOKENS)
@pytest.mark.parametrize("E,K,ep,placement,rank", DISPATCH)
def test_dispatch_ref_invariants(E, K, ep, placement, rank, T, bm):
    spec = make_spec(num_experts=E, top_k=K, parallel={"ep_size": ep, "expert_placement": placement})
    emap = expert_map_ref(spec, rank)
    gen = torch.Generator().manual_seed(17 * T + bm + E)
    ids = random_ids(T, E, K, gen)
    _, local_of = check_dispatch(ids, emap, spec.local_experts, bm)
    if ep > 1 and T >= 17:
        assert any(le < 0 for le in local_of) and any(le >= 0 for le in local_of)


@pytest.mark.parametrize("tile", [8, 24, 64])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("E,K,ep,placement,rank", DISPATCH)
def test_tile_counts_place_every_slot_where_dispatch_ref_does(E, K, ep, placement, rank, T, tile):
    """The multi-block dispatch's contract (kernels.dispatch.dispatch_tiles_funcs): slot s of tile t
    goes to offsets[e] + tile_counts[t, e] + (slots of e before s in tile t). With tile_counts_ref's
    scratch that lands every local slot on dispatch_ref's row, and the last tile's entries plus its own
    counts give the expert totals."""
    from moegen.reference import tile_counts_ref, tile_counts_size

    spec = make_spec(num_experts=E, top_k=K, parallel={"ep_size": ep, "expert_placement": placement})
    emap, El = expert_map_ref(spec, rank), spec.local_experts
    ids = random_ids(T, E, K, torch.Generator().manual_seed(5 * T + tile + E))
    d = dispatch_ref(ids, emap, El, 4)
    tiles = tile_counts_ref(ids, emap, El, tile)
    assert tiles.dtype == torch.int32 and tiles.numel() == tile_counts_size(T, K, El, tile)
    tiles = tiles.view(-1, El)
    local = emap.long()[ids.reshape(-1).long()]
    seen = torch.zeros_like(tiles)
    for s, e in enumerate(local.tolist()):
        if e < 0:
            continue
        t = s // tile
        assert d["offsets"][e] + tiles[t, e] + seen[t, e] == d["slot_pos"][s], (s, e)
        seen[t, e] += 1
    assert torch.equal(tiles[-1] + seen[-1], d["counts"])


# ---- expert maps --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("E,ep", [(8, 1), (8, 2), (16, 4), (6, 3), (8, 8)])
@pytest.mark.parametrize("placement", ["linear", "round_robin"])
def test_expert_map_partitions_experts(E, ep, placement):
    spec = make_spec(num_experts=E, top_k=1, parallel={"ep_size": ep, "expert_placement": placement})
    El = E // ep
    owners = {}
    for r in range(ep):
        m = expert_map_ref(spec, r)
        assert m.dtype == torch.int32 and m.shape == (E,)
        assert sorted(v for v in m.tolist() if v >= 0) == list(range(El))
        for e, v in enumerate(m.tolist()):
            if v >= 0:
                assert e not in owners
                owners[e] = (r, v)
    assert sorted(owners) == list(range(E))
    for e, (r, v) in owners.items():
        if placement == "linear":
            assert (r, v) == (e // El, e - (e // El) * El)
        else:
            assert (r, v) == (e % ep, e // ep)


# ---- the whole layer ---------------------------------------------------------------------------------------

LAYERS = {
    "silu": dict(),
    "gelu-E6": dict(activation="gelu", num_experts=6, top_k=3),
    "swigluoai-clamped": dict(activation="swigluoai", swiglu_alpha=1.702, swiglu_limit=0.75, expert_bias=True),
    "relu2": dict(activation="relu2", num_experts=16, top_k=4),
    "sigmoid-raw-scaled": dict(router={"scoring": "sigmoid", "renormalize": False, "routed_scaling_factor": 2.5}),
    "deepseek": dict(num_experts=16, top_k=4, router={"scoring": "sigmoid", "num_expert_group": 4, "topk_group": 2,
                                                       "correction_bias": True, "routed_scaling_factor": 2.5},
                     shared_experts={"intermediate_size": 20}),
    "grouped-softmax": dict(num_experts=16, top_k=3, router={"num_expert_group": 8, "topk_group": 3}),
    "qwen2-shared-gate": dict(shared_experts={"intermediate_size": 36, "gate": "sigmoid"}),
    "relu2-shared-latent": dict(activation="relu2", latent_size=24, shared_experts={"intermediate_size": 20}),
    "latent": dict(latent_size=24, padding={"hidden_multiple": 16}),
    "weight-on-input": dict(top_k=1, expert_bias=True, router={"apply_weight_on_input": True,
                                                               "renormalize": False}),
    "weight-on-input-gelu": dict(top_k=1, activation="gelu", router={"apply_weight_on_input": True,
                                                                       "renormalize": False, "scoring": "sigmoid"}),
    "gpt-oss-gate": dict(activation="swigluoai", swiglu_limit=1.0, expert_bias=True, top_k=4, _gate=True,
                         _gate_bias=True),
    "gate-latent": dict(latent_size=24, _gate=True),
    "bf16": dict(dtype="bfloat16", expert_bias=True, shared_experts={"intermediate_size": 20, "gate": "sigmoid"}),
}


def layer_case(name, seed=0):
    kw = dict(LAYERS[name])
    gate, gate_bias = kw.pop("_gate", False), kw.pop("_gate_bias", False)
    spec = make_spec(**kw)
    W = random_weights(spec, seed, gate=gate, scale=2.0)
    if gate:
        W["gate"] = W["gate"] * 4  # spread the logits
    if gate_bias:
        shape, dtype = OPTIONAL_WEIGHTS["gate_bias"](spec)
        W["gate_bias"] = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))).to(
            getattr(torch, dtype))
    if spec.router.correction_bias:
        W["e_score_correction_bias"] = torch.randn(spec.num_experts,
                                                   generator=torch.Generator().manual_seed(seed + 2)) * 0.3
    return spec, W


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_moe_ref_matches_dense_layer(name, T):
    spec, W = layer_case(name, seed=T)
    x, logits = make_inputs(spec, W, T, seed=100 + T)
    pre = []
    got = moe_ref(spec, W, x, logits)
    want = dense_layer(spec, W, x, logits, pre_acts=pre)
    rtol = RTOL[getattr(torch, spec.dtype)]
    if spec.shared_experts is not None:
        assert isinstance(got, tuple) and len(got) == 2
        assert got[0].shape == (T, spec.hidden_size) and got[1].shape == (T, spec.routed_width)
        assert_close(got[0], want[0], rtol)
        assert_close(got[1], want[1], rtol)
    else:
        assert isinstance(got, torch.Tensor) and got.shape == (T, spec.routed_width)
        assert got.dtype == torch.float32
        assert_close(got, want, rtol)
    if spec.activation == "swigluoai" and T >= 17:
        h = torch.cat(pre)
        n = h.shape[1] // 2
        assert (h[:, :n] > spec.swiglu_limit).any(), "the gate clamp is never exercised"
        assert (h[:, n:].abs() > spec.swiglu_limit).any(), "the up clamp is never exercised"


def test_moe_ref_options_matter():
    """Guards that the dense comparisons above can fail: flipping an option changes the output."""
    T = 17
    spec, W = layer_case("weight-on-input", seed=3)
    x, logits = make_inputs(spec, W, T, seed=4)
    flipped = make_spec(**{**LAYERS["weight-on-input"], "router": {"renormalize": False}})
    assert not torch.allclose(moe_ref(spec, W, x, logits), moe_ref(flipped, W, x, logits), rtol=1e-3)
    spec, W = layer_case("qwen2-shared-gate", seed=3)
    x, logits = make_inputs(spec, W, T, seed=4)
    sh_gated, _ = moe_ref(spec, W, x, logits)
    nogate = make_spec(shared_experts={"intermediate_size": 36})
    sh_plain, _ = moe_ref(nogate, W, x, logits)
    assert not torch.allclose(sh_gated, sh_plain, rtol=1e-3)
    spec, W = layer_case("gpt-oss-gate", seed=3)
    x, _ = make_inputs(spec, W, T, seed=4)
    no_bias = {k: v for k, v in W.items() if k != "gate_bias"}
    assert not torch.allclose(moe_ref(spec, W, x), moe_ref(spec, no_bias, x), rtol=1e-3)


def test_internal_gate_overrides_given_logits():
    spec, W = layer_case("gate-latent", seed=5)
    x, _ = make_inputs(spec, W, 17, seed=6)
    junk = torch.randn(17, spec.num_experts) * 10
    assert_close(moe_ref(spec, W, x, junk), dense_layer(spec, W, x))


def test_moe_ref_without_logits_or_gate_raises():
    spec = make_spec()
    W = random_weights(spec, 0)
    with pytest.raises(ValueError):
        moe_ref(spec, W, torch.randn(3, spec.hidden_size))


def test_mlp_ref_matches_dense():
    gen = torch.Generator().manual_seed(9)
    x, w13, w2 = torch.randn(17, 40, generator=gen), torch.randn(48, 40, generator=gen), torch.randn(40, 24,
                                                                                                       generator=gen)
    want = act_twin(x.double() @ w13.double().T, "silu") @ w2.double().T
    assert_close(mlp_ref(x, w13, w2, "silu"), want)


@pytest.mark.parametrize("name", ["deepseek", "relu2-shared-latent", "gpt-oss-gate", "bf16"])
def test_random_weights_follow_the_contract(name):
    kw = dict(LAYERS[name])
    gate = kw.pop("_gate", False)
    kw.pop("_gate_bias", None)
    spec = make_spec(**kw)
    W = random_weights(spec, 3, gate=gate)
    contract = dict(weights_contract(spec))
    if gate:
        contract["gate"] = OPTIONAL_WEIGHTS["gate"](spec)
    assert set(W) == set(contract)
    for n, (shape, dtype) in contract.items():
        assert tuple(W[n].shape) == shape and W[n].dtype == getattr(torch, dtype), n
    again, other = random_weights(spec, 3, gate=gate), random_weights(spec, 4, gate=gate)
    assert all(torch.equal(W[n], again[n]) for n in W)
    assert not torch.equal(W["w13"], other["w13"])


# ---- the experts twins, composed -------------------------------------------------------------------------------

EXPERTS = ["silu", "gelu-E6", "swigluoai-clamped", "relu2", "weight-on-input", "latent"]


def padded_problem(spec, W, x, T, seed):
    """Route independently, then pad x / w13 / w2 / biases to Hp with poison where only zeros meet it."""
    Hr, Hp = spec.routed_width, spec.kernel_hidden
    xr = x.float() @ W["latent_proj"].float().T if spec.latent_size is not None else x.float()
    gen = torch.Generator().manual_seed(seed)
    logits = tie_free_logits(T, spec.num_experts, gen, spec.router)
    ids, w = route_loops(logits, spec.router, spec.top_k)
    ids, w = ids.to(torch.int32), w.float()
    xp = torch.zeros(T, Hp)
    xp[:, :Hr] = xr
    w13 = torch.full((spec.num_experts, W["w13"].shape[1], Hp), POISON)
    w13[:, :, :Hr] = W["w13"].float()
    w2 = torch.full((spec.num_experts, Hp, W["w2"].shape[2]), POISON)
    w2[:, :Hr] = W["w2"].float()
    b13 = W["w13_bias"].float() if spec.expert_bias else None
    b2 = None
    if spec.expert_bias:
        b2 = torch.full((spec.num_experts, Hp), POISON)
        b2[:, :Hr] = W["w2_bias"].float()
    return logits, ids, w, xp, w13, w2, b13, b2


def run_experts(spec, ids, w, xp, w13, w2, b13, b2, emap, El, bm):
    d = dispatch_ref(ids, emap, El, bm)
    awoi = spec.router.apply_weight_on_input
    act = experts_up_ref(xp, w, d, w13, b13, bm, spec.activation, spec.swiglu_alpha, spec.swiglu_limit, awoi)
    MP = d["sorted_ids"].numel()
    I = w13.shape[1] // (2 if spec.gated else 1)
    assert act.shape == (MP, I) and act.dtype == torch.float32
    pad_rows = d["sorted_ids"] == ids.numel()
    assert (act[pad_rows] == 0).all(), "padding rows of the up projection must be zero"
    out = experts_down_ref(act, w, d, w2, b2, bm, awoi)
    assert out.shape == (ids.shape[0], xp.shape[1]) and out.dtype == torch.float32
    return out


@pytest.mark.parametrize("bm", [1, 4, 16])
@pytest.mark.parametrize("T", (0,) + TOKENS)
@pytest.mark.parametrize("name", EXPERTS)
def test_experts_twins_compose_to_dense_layer(name, T, bm):
    spec, W = layer_case(name, seed=T + 1)
    if name == "latent":
        assert spec.kernel_hidden > spec.routed_width  # padding is really exercised
    gen = torch.Generator().manual_seed(200 + T)
    x = torch.randn(T, spec.hidden_size, generator=gen)
    logits, ids, w, xp, w13, w2, b13, b2 = padded_problem(spec, W, x, T, seed=300 + T)
    out = run_experts(spec, ids, w, xp, w13, w2, b13, b2, expert_map_ref(spec), spec.num_experts, bm)
    want = dense_layer(spec, W, x, logits)
    assert_close(out[:, :spec.routed_width], want)


@pytest.mark.parametrize("placement", ["linear", "round_robin"])
@pytest.mark.parametrize("ep", [2, 4])
@pytest.mark.parametrize("name", ["silu", "swigluoai-clamped", "relu2"])
def test_expert_parallel_ranks_sum_to_single_rank(name, ep, placement):
    kw = dict(LAYERS[name])
    if (kw.get("num_experts", 8)) % ep:
        pytest.fail("bad test parameters")
    kw["parallel"] = {"ep_size": ep, "expert_placement": placement}
    spec = make_spec(**kw)
    single = make_spec(**LAYERS[name])
    W = random_weights(spec, 21, scale=2.0)
    T, bm = 17, 4
    x = torch.randn(T, spec.hidden_size, generator=torch.Generator().manual_seed(22))
    logits, ids, w, xp, w13, w2, b13, b2 = padded_problem(spec, W, x, T, seed=23)
    whole = run_experts(single, ids, w, xp, w13, w2, b13, b2, expert_map_ref(single), single.num_experts, bm)
    total = torch.zeros_like(whole)
    El = spec.local_experts
    for r in range(ep):
        emap = expert_map_ref(spec, r)
        glob = [e for e in range(spec.num_experts) if emap[e] >= 0]
        glob.sort(key=lambda e: int(emap[e]))  # local index -> global expert
        assert len(glob) == El
        part = run_experts(spec, ids, w, xp, w13[glob], w2[glob], None if b13 is None else b13[glob],
                           None if b2 is None else b2[glob], emap, El, bm)
        assert part.abs().sum() > 0
        assert not torch.allclose(part, whole)  # each rank holds only part of the answer
        total += part
    assert_close(total, whole)
    assert_close(total[:, :spec.routed_width], dense_layer(single, W, x, logits))


@pytest.mark.parametrize("T", (0,) + TOKENS)
@pytest.mark.parametrize("name", EXPERTS)
def test_fused_twin_is_the_dense_layer(name, T):
    """experts_fused_ref (the fused decode kernel's twin: one block per slot and tile, no sort) gives the
    dense layer, and summed over EP ranks (each rank's slots of other ranks' experts are -1) the same."""
    from moegen.reference import dispatch_unsorted_ref

    spec, W = layer_case(name, seed=T + 5)
    gen = torch.Generator().manual_seed(400 + T)
    x = torch.randn(T, spec.hidden_size, generator=gen)
    logits, ids, w, xp, w13, w2, b13, b2 = padded_problem(spec, W, x, T, seed=500 + T)
    woi = spec.router.apply_weight_on_input
    args = (spec.activation, spec.swiglu_alpha, spec.swiglu_limit, woi)
    be = dispatch_unsorted_ref(ids, expert_map_ref(spec))["block_expert"]
    out = experts_fused_ref(xp, w, be, w13, b13, w2, b2, *args)
    assert out.shape == (T, xp.shape[1]) and out.dtype == torch.float32
    assert_close(out[:, :spec.routed_width], dense_layer(spec, W, x, logits))
    if T and spec.num_experts % 2 == 0:  # two EP ranks, linear placement: experts [0, E/2) and [E/2, E)
        half = spec.num_experts // 2
        total = torch.zeros_like(out)
        for r in range(2):
            emap = torch.tensor([e - r * half if r * half <= e < (r + 1) * half else -1
                                 for e in range(spec.num_experts)], dtype=torch.int32)
            sl = slice(r * half, (r + 1) * half)
            part = experts_fused_ref(xp, w, dispatch_unsorted_ref(ids, emap)["block_expert"], w13[sl],
                                     None if b13 is None else b13[sl], w2[sl], None if b2 is None else b2[sl], *args)
            total += part
        assert_close(total, out)
