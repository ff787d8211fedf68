"""Tier 0: moegen/spec.py — parsing, defaults, hashing, validation messages, weights contract.

Shape legend: T tokens, E experts, El local experts, K top-k, H hidden, Hp kernel hidden, I intermediate,
L latent, Is shared intermediate.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from moegen.spec import (
    OPTIONAL_WEIGHTS,
    MoESpec,
    SpecError,
    load_spec,
    parse_spec,
    spec_from_dict,
    weights_contract,
)

BASE = {"name": "tiny", "dtype": "float32", "hidden_size": 64, "intermediate_size": 32, "num_experts": 8,
        "top_k": 2}

# Every field set away from its default (and grouped routing on), to exercise all of parse_spec's outputs.
FULL = {
    "name": "full-spec_v1.2",
    "dtype": "float16",
    "hidden_size": 2880,
    "intermediate_size": 96,
    "num_experts": 16,
    "top_k": 4,
    "activation": "swigluoai",
    "swiglu_alpha": 1.5,
    "swiglu_limit": 5,
    "expert_bias": True,
    "router": {"scoring": "sigmoid", "renormalize": False, "num_expert_group": 4, "topk_group": 2,
               "correction_bias": True, "routed_scaling_factor": 2.5, "apply_weight_on_input": False},
    "shared_experts": {"intermediate_size": 48, "gate": "sigmoid"},
    "latent_size": 1000,
    "quant": {"scheme": "none"},
    "parallel": {"tp_size": 2, "ep_size": 4, "expert_placement": "round_robin", "sequence_parallel": True},
    "padding": {"hidden_multiple": 256},
    "max_chunk_tokens": 4096,
}


def with_(base: dict, **changes) -> dict:
    """A deep copy of `base` with dotted-path changes (`router__scoring='x'` sets router.scoring);
    the value DROP removes the key."""
    d = copy.deepcopy(base)
    for path, value in changes.items():
        keys = path.split("__")
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is DROP:
            node.pop(keys[-1], None)
        else:
            node[keys[-1]] = value
    return d


DROP = object()


def reversed_mapping(d):
    """The same mapping with every level's key order reversed."""
    if isinstance(d, dict):
        return {k: reversed_mapping(d[k]) for k in reversed(list(d))}
    return d


# ---- valid specs -------------------------------------------------------------------------------


def test_minimal_spec_fills_defaults():
    s = parse_spec(BASE)
    assert (s.name, s.dtype, s.hidden_size, s.intermediate_size, s.num_experts, s.top_k) == (
        "tiny", "float32", 64, 32, 8, 2)
    assert s.activation == "silu" and s.gated
    assert s.swiglu_alpha == 1.702 and s.swiglu_limit == 7.0
    assert s.expert_bias is False
    r = s.router
    assert (r.scoring, r.renormalize, r.num_expert_group, r.topk_group, r.correction_bias,
            r.routed_scaling_factor, r.apply_weight_on_input) == ("softmax", True, None, None, False, 1.0, False)
    assert not r.grouped
    assert s.shared_experts is None and s.latent_size is None
    assert s.quant.scheme == "none"
    p = s.parallel
    assert (p.tp_size, p.ep_size, p.expert_placement, p.sequence_parallel) == (1, 1, "linear", False)
    assert s.padding.hidden_multiple == 1
    assert s.max_chunk_tokens == 32768


def test_dtype_default_and_explicit_nulls_mean_default():
    s = parse_spec(with_(BASE, dtype=DROP))
    assert s.dtype in ("float32", "float16", "bfloat16")
    # null sections and null optional ints are "absent"
    s2 = parse_spec(with_(BASE, router=None, shared_experts=None, latent_size=None, parallel=None, padding=None,
                          quant=None, max_chunk_tokens=None))
    assert s2 == parse_spec(BASE)


def test_full_spec_keeps_every_field():
    s = parse_spec(FULL)
    assert s.name == "full-spec_v1.2" and s.dtype == "float16"
    assert (s.hidden_size, s.intermediate_size, s.num_experts, s.top_k) == (2880, 96, 16, 4)
    assert s.activation == "swigluoai" and s.swiglu_alpha == 1.5
    assert s.swiglu_limit == 5.0 and isinstance(s.swiglu_limit, float)
    assert s.expert_bias is True
    r = s.router
    assert (r.scoring, r.renormalize, r.num_expert_group, r.topk_group, r.correction_bias,
            r.routed_scaling_factor, r.apply_weight_on_input) == ("sigmoid", False, 4, 2, True, 2.5, False)
    assert r.grouped
    assert s.shared_experts is not None
    assert (s.shared_experts.intermediate_size, s.shared_experts.gate) == (48, "sigmoid")
    assert s.latent_size == 1000
    p = s.parallel
    assert (p.tp_size, p.ep_size, p.expert_placement, p.sequence_parallel) == (2, 4, "round_robin", True)
    assert s.padding.hidden_multiple == 256
    assert s.max_chunk_tokens == 4096


@pytest.mark.parametrize("act", ["silu", "gelu", "swigluoai", "relu2"])
def test_every_activation_parses(act):
    s = parse_spec(with_(BASE, activation=act))
    assert s.activation == act
    assert s.gated == (act != "relu2")


def test_apply_weight_on_input_with_top_k_1():
    s = parse_spec(with_(BASE, top_k=1, router__apply_weight_on_input=True))
    assert s.router.apply_weight_on_input and s.top_k == 1


def test_top_k_equal_to_groups_capacity_is_allowed():
    # E=8, G=4 -> 2 per group; TG=2 keeps 4 experts, so K=4 is the largest allowed
    s = parse_spec(with_(BASE, top_k=4, router__num_expert_group=4, router__topk_group=2))
    assert s.top_k == 4 and s.router.topk_group == 2


def test_specs_are_frozen():
    s = parse_spec(FULL)
    for obj, attr, val in [(s, "top_k", 3), (s, "name", "x"), (s.router, "scoring", "softmax"),
                           (s.parallel, "tp_size", 1), (s.padding, "hidden_multiple", 1), (s.quant, "scheme", "x"),
                           (s.shared_experts, "gate", "none")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, val)
    assert hash(s) == hash(parse_spec(FULL))  # frozen dataclasses are hashable by value


@pytest.mark.parametrize("data", [BASE, FULL], ids=["base", "full"])
def test_hash_is_stable_across_key_order(data):
    a = parse_spec(data)
    b = parse_spec(reversed_mapping(data))
    assert list(reversed_mapping(data)) != list(data)
    assert a == b
    assert a.hash == b.hash
    assert a.canonical_json() == b.canonical_json()
    assert isinstance(a.hash, str) and len(a.hash) == 16 and int(a.hash, 16) >= 0


def test_hash_is_deterministic_value():
    # the hash is the sha256 of the canonical JSON (so it is reproducible in another process)
    import hashlib

    s = parse_spec(FULL)
    assert s.hash == hashlib.sha256(s.canonical_json().encode()).hexdigest()[:16]
    assert json.loads(s.canonical_json()) == s.to_dict()


VARIANTS = [
    {},
    {"name": "tiny2"},
    {"dtype": "bfloat16"},
    {"hidden_size": 65},
    {"intermediate_size": 16},
    {"num_experts": 16},
    {"top_k": 1},
    {"activation": "gelu"},
    {"swiglu_alpha": 1.0},
    {"swiglu_limit": 6.0},
    {"expert_bias": True},
    {"router__scoring": "sigmoid"},
    {"router__renormalize": False},
    {"router__num_expert_group": 4, "router__topk_group": 2},
    {"router__num_expert_group": 4, "router__topk_group": 3},
    {"router__correction_bias": True},
    {"router__routed_scaling_factor": 2.0},
    {"top_k": 1, "router__apply_weight_on_input": True},
    {"shared_experts": {"intermediate_size": 32}},
    {"shared_experts": {"intermediate_size": 32, "gate": "sigmoid"}},
    {"latent_size": 16},
    {"parallel__tp_size": 2},
    {"parallel__ep_size": 2},
    {"parallel__ep_size": 2, "parallel__expert_placement": "round_robin"},
    {"parallel__sequence_parallel": True},
    {"padding__hidden_multiple": 128},
    {"max_chunk_tokens": 1024},
]


def test_hash_differs_for_different_specs():
    specs = [parse_spec(with_(BASE, **v)) for v in VARIANTS]
    hashes = [s.hash for s in specs]
    assert len(set(hashes)) == len(VARIANTS), "two different specs share a hash"
    assert len(set(specs)) == len(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS + [None], ids=[str(i) for i in range(len(VARIANTS))] + ["full"])
def test_round_trip_through_dict_and_json(variant):
    s = parse_spec(FULL if variant is None else with_(BASE, **variant))
    assert spec_from_dict(s.to_dict()) == s
    # the manifest stores JSON: the round trip must survive it too
    back = spec_from_dict(json.loads(s.canonical_json()))
    assert back == s and back.hash == s.hash


def test_to_dict_is_plain_data():
    d = parse_spec(FULL).to_dict()
    assert d["router"]["num_expert_group"] == 4 and d["parallel"]["ep_size"] == 4
    json.dumps(d)  # only JSON types inside
    assert isinstance(d["router"], dict) and isinstance(d["shared_experts"], dict)


# ---- invalid specs -----------------------------------------------------------------------------

# (id, data, field path, bad value, a piece of the "allowed" text)
BAD = [
    # structure
    ("root-list", [1, 2], "<root>", [1, 2], "mapping"),
    ("root-none", None, "<root>", None, "mapping"),
    ("root-str", "tiny", "<root>", "tiny", "mapping"),
    ("unknown-top", with_(BASE, hidden=64), "hidden", 64, "hidden_size"),
    ("unknown-top-typo", with_(BASE, topk=2), "topk", 2, "top_k"),
    ("unknown-router", with_(BASE, router__scoring_func="softmax"), "router.scoring_func", "softmax", "scoring"),
    ("unknown-router-property", with_(BASE, router__grouped=True), "router.grouped", True, "num_expert_group"),
    ("unknown-shared", with_(BASE, shared_experts={"intermediate_size": 32, "count": 2}), "shared_experts.count",
     2, "intermediate_size"),
    ("unknown-quant", with_(BASE, quant__bits=4), "quant.bits", 4, "scheme"),
    ("unknown-parallel", with_(BASE, parallel__dp_size=2), "parallel.dp_size", 2, "tp_size"),
    ("unknown-padding", with_(BASE, padding__multiple=64), "padding.multiple", 64, "hidden_multiple"),
    ("router-not-mapping", with_(BASE, router="softmax"), "router", "softmax", "mapping"),
    ("router-list", with_(BASE, router=[1]), "router", [1], "mapping"),
    ("shared-not-mapping", with_(BASE, shared_experts=32), "shared_experts", 32, "mapping"),
    ("quant-not-mapping", with_(BASE, quant="none"), "quant", "none", "mapping"),
    ("parallel-not-mapping", with_(BASE, parallel=2), "parallel", 2, "mapping"),
    ("padding-not-mapping", with_(BASE, padding=256), "padding", 256, "mapping"),
    # name
    ("name-missing", with_(BASE, name=DROP), "name", None, "letters"),
    ("name-empty", with_(BASE, name=""), "name", "", "letters"),
    ("name-slash", with_(BASE, name="a/b"), "name", "a/b", "letters"),
    ("name-dotdot", with_(BASE, name="../x"), "name", "../x", "letters"),
    ("name-space", with_(BASE, name="my spec"), "name", "my spec", "letters"),
    ("name-leading-dot", with_(BASE, name=".hidden"), "name", ".hidden", "letters"),
    ("name-leading-dash", with_(BASE, name="-x"), "name", "-x", "letters"),
    ("name-trailing-newline", with_(BASE, name="tiny\n"), "name", "tiny\n", "letters"),
    ("name-int", with_(BASE, name=7), "name", 7, "letters"),
    # dtype / activation / choices
    ("dtype-bad", with_(BASE, dtype="float64"), "dtype", "float64", "float32 | float16 | bfloat16"),
    ("dtype-null", with_(BASE, dtype=None), "dtype", None, "bfloat16"),
    ("activation-bad", with_(BASE, activation="relu"), "activation", "relu", "silu | gelu | swigluoai | relu2"),
    ("scoring-bad", with_(BASE, router__scoring="softplus"), "router.scoring", "softplus", "softmax | sigmoid"),
    ("shared-gate-bad", with_(BASE, shared_experts={"intermediate_size": 32, "gate": "softmax"}),
     "shared_experts.gate", "softmax", "none | sigmoid"),
    ("placement-bad", with_(BASE, parallel__expert_placement="random"), "parallel.expert_placement", "random",
     "linear | round_robin"),
    ("placement-case", with_(BASE, parallel__expert_placement="Linear"), "parallel.expert_placement", "Linear",
     "linear | round_robin"),
    ("quant-scheme-unknown", with_(BASE, quant__scheme="int3"), "quant.scheme", "int3", "int8_w8a16"),
    ("quant-int8", with_(BASE, quant__scheme="int8_w8a16"), "quant.scheme", "int8_w8a16", "not yet supported"),
    ("quant-int4", with_(BASE, quant={"scheme": "int4_w4a16", "group_size": 128}), "quant.scheme", "int4_w4a16",
     "not yet supported"),
    ("quant-fp8", with_(BASE, quant={"scheme": "fp8_w8a8", "block": [128, 128]}), "quant.scheme", "fp8_w8a8",
     "not yet supported"),
    # sizes
    ("hidden-missing", with_(BASE, hidden_size=DROP), "hidden_size", None, "required"),
    ("hidden-zero", with_(BASE, hidden_size=0), "hidden_size", 0, "integer >= 1"),
    ("hidden-negative", with_(BASE, hidden_size=-64), "hidden_size", -64, "integer >= 1"),
    ("hidden-float", with_(BASE, hidden_size=64.0), "hidden_size", 64.0, "integer"),
    ("hidden-str", with_(BASE, hidden_size="64"), "hidden_size", "64", "integer"),
    ("hidden-bool", with_(BASE, hidden_size=True), "hidden_size", True, "integer"),
    ("intermediate-missing", with_(BASE, intermediate_size=DROP), "intermediate_size", None, "required"),
    ("intermediate-float", with_(BASE, intermediate_size=32.5), "intermediate_size", 32.5, "integer"),
    ("experts-missing", with_(BASE, num_experts=DROP), "num_experts", None, "required"),
    ("experts-zero", with_(BASE, num_experts=0), "num_experts", 0, "integer >= 1"),
    ("experts-bool", with_(BASE, num_experts=False), "num_experts", False, "integer"),
    ("topk-missing", with_(BASE, top_k=DROP), "top_k", None, "required"),
    ("topk-zero", with_(BASE, top_k=0), "top_k", 0, "integer >= 1"),
    ("topk-list", with_(BASE, top_k=[2]), "top_k", [2], "integer"),
    ("topk-gt-experts", with_(BASE, top_k=9), "top_k", 9, "1..num_experts (8)"),
    ("latent-zero", with_(BASE, latent_size=0), "latent_size", 0, "integer >= 1"),
    ("latent-str", with_(BASE, latent_size="16"), "latent_size", "16", "integer"),
    ("latent-bool", with_(BASE, latent_size=True), "latent_size", True, "integer"),
    ("shared-missing-size", with_(BASE, shared_experts={"gate": "sigmoid"}), "shared_experts.intermediate_size",
     None, "required"),
    ("shared-size-zero", with_(BASE, shared_experts={"intermediate_size": 0}), "shared_experts.intermediate_size",
     0, "integer >= 1"),
    ("shared-size-float", with_(BASE, shared_experts={"intermediate_size": 1.5}),
     "shared_experts.intermediate_size", 1.5, "integer"),
    ("max-chunk-zero", with_(BASE, max_chunk_tokens=0), "max_chunk_tokens", 0, "integer >= 1"),
    ("max-chunk-str", with_(BASE, max_chunk_tokens="big"), "max_chunk_tokens", "big", "integer"),
    ("hidden-multiple-zero", with_(BASE, padding__hidden_multiple=0), "padding.hidden_multiple", 0,
     "integer >= 1"),
    ("hidden-multiple-negative", with_(BASE, padding__hidden_multiple=-256), "padding.hidden_multiple", -256,
     "integer >= 1"),
    ("hidden-multiple-float", with_(BASE, padding__hidden_multiple=2.5), "padding.hidden_multiple", 2.5,
     "integer"),
    # floats
    ("alpha-zero", with_(BASE, swiglu_alpha=0), "swiglu_alpha", 0, "> 0"),
    ("alpha-negative", with_(BASE, swiglu_alpha=-1.7), "swiglu_alpha", -1.7, "> 0"),
    ("alpha-str", with_(BASE, swiglu_alpha="1.7"), "swiglu_alpha", "1.7", "number"),
    ("alpha-bool", with_(BASE, swiglu_alpha=True), "swiglu_alpha", True, "number"),
    ("limit-zero", with_(BASE, swiglu_limit=0.0), "swiglu_limit", 0.0, "> 0"),
    ("limit-nan", with_(BASE, swiglu_limit=float("nan")), "swiglu_limit", float("nan"), "> 0"),
    ("scale-zero", with_(BASE, router__routed_scaling_factor=0), "router.routed_scaling_factor", 0, "> 0"),
    ("scale-negative", with_(BASE, router__routed_scaling_factor=-2.5), "router.routed_scaling_factor", -2.5,
     "> 0"),
    ("scale-str", with_(BASE, router__routed_scaling_factor="2.5"), "router.routed_scaling_factor", "2.5",
     "number"),
    ("scale-bool", with_(BASE, router__routed_scaling_factor=True), "router.routed_scaling_factor", True, "number"),
    # bools
    ("expert-bias-str", with_(BASE, expert_bias="yes"), "expert_bias", "yes", "true | false"),
    ("expert-bias-int", with_(BASE, expert_bias=1), "expert_bias", 1, "true | false"),
    ("renormalize-str", with_(BASE, router__renormalize="true"), "router.renormalize", "true", "true | false"),
    ("correction-bias-int", with_(BASE, router__correction_bias=0), "router.correction_bias", 0, "true | false"),
    ("awoi-str", with_(BASE, top_k=1, router__apply_weight_on_input="on"), "router.apply_weight_on_input", "on",
     "true | false"),
    ("seq-parallel-str", with_(BASE, parallel__sequence_parallel="no"), "parallel.sequence_parallel", "no",
     "true | false"),
    # grouped top-k
    ("group-only-G", with_(BASE, router__num_expert_group=4), "router.topk_group", None, "set together"),
    ("group-only-TG", with_(BASE, router__topk_group=2), "router.num_expert_group", None, "set together"),
    ("group-G-zero", with_(BASE, router__num_expert_group=0, router__topk_group=1), "router.num_expert_group", 0,
     "integer >= 1"),
    ("group-G-bool", with_(BASE, router__num_expert_group=True, router__topk_group=1), "router.num_expert_group",
     True, "integer"),
    ("group-TG-zero", with_(BASE, router__num_expert_group=4, router__topk_group=0), "router.topk_group", 0,
     "integer >= 1"),
    ("group-TG-float", with_(BASE, router__num_expert_group=4, router__topk_group=1.0), "router.topk_group", 1.0,
     "integer"),
    ("group-G-not-divisor", with_(BASE, router__num_expert_group=3, router__topk_group=1),
     "router.num_expert_group", 3, "divisor of num_experts (8)"),
    ("group-G-gt-E", with_(BASE, router__num_expert_group=16, router__topk_group=1), "router.num_expert_group", 16,
     "divisor of num_experts (8)"),
    ("group-TG-gt-G", with_(BASE, router__num_expert_group=4, router__topk_group=5), "router.topk_group", 5,
     "1..num_expert_group (4)"),
    ("group-K-too-large", with_(BASE, top_k=3, router__num_expert_group=4, router__topk_group=1), "top_k", 3,
     "topk_group * experts per group (2)"),
    ("group-K-too-large-2", with_(BASE, top_k=5, router__num_expert_group=4, router__topk_group=2), "top_k", 5,
     "topk_group * experts per group (4)"),
    ("awoi-topk-2", with_(BASE, router__apply_weight_on_input=True), "router.apply_weight_on_input", True,
     "top_k == 1"),
    # parallel
    ("tp-zero", with_(BASE, parallel__tp_size=0), "parallel.tp_size", 0, "integer >= 1"),
    ("tp-str", with_(BASE, parallel__tp_size="2"), "parallel.tp_size", "2", "integer"),
    ("ep-zero", with_(BASE, parallel__ep_size=0), "parallel.ep_size", 0, "integer >= 1"),
    ("ep-bool", with_(BASE, parallel__ep_size=True), "parallel.ep_size", True, "integer"),
    ("tp-not-dividing-I", with_(BASE, parallel__tp_size=3), "parallel.tp_size", 3,
     "divisor of intermediate_size (32)"),
    ("tp-not-dividing-shared", with_(BASE, shared_experts={"intermediate_size": 24}, parallel__tp_size=16),
     "parallel.tp_size", 16, "divisor of shared_experts.intermediate_size (24)"),
    ("ep-not-dividing-E", with_(BASE, parallel__ep_size=3), "parallel.ep_size", 3, "divisor of num_experts (8)"),
    ("ep-gt-E", with_(BASE, parallel__ep_size=16), "parallel.ep_size", 16, "divisor of num_experts (8)"),
]


@pytest.mark.parametrize("data,field,value,allowed", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_field_gives_one_line_naming_field_value_and_allowed(data, field, value, allowed):
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    err = info.value
    msg = str(err)
    assert isinstance(err, ValueError)
    assert "\n" not in msg and "\r" not in msg, f"message is not one line: {msg!r}"
    assert err.field == field, msg
    assert f"'{field}'" in msg, msg
    if value is not None and value != value:  # nan
        assert "nan" in msg, msg
    else:
        assert repr(value) in msg, msg
    assert allowed in msg, msg


def test_bad_cases_are_one_fix_away_from_valid():
    """Guard: the invalid cases above fail for the reason named, not for an unrelated field.
    Each valid twin below differs from a BAD case only in the offending value."""
    fixes = {
        "group-only-G": with_(BASE, router__num_expert_group=4, router__topk_group=1),
        "group-TG-gt-G": with_(BASE, router__num_expert_group=4, router__topk_group=4),
        "group-K-too-large": with_(BASE, top_k=2, router__num_expert_group=4, router__topk_group=1),
        "tp-not-dividing-shared": with_(BASE, shared_experts={"intermediate_size": 32}, parallel__tp_size=16),
        "ep-not-dividing-E": with_(BASE, parallel__ep_size=4),
        "awoi-topk-2": with_(BASE, top_k=1, router__apply_weight_on_input=True),
        "name-slash": with_(BASE, name="a_b"),
    }
    for case, data in fixes.items():
        parse_spec(data)  # must not raise


def test_unknown_key_message_lists_allowed_fields():
    with pytest.raises(SpecError) as info:
        parse_spec(with_(BASE, router__scoring_func="softmax"))
    msg = str(info.value)
    for f in ("scoring", "renormalize", "num_expert_group", "topk_group", "correction_bias",
              "routed_scaling_factor", "apply_weight_on_input"):
        assert f in msg


def test_multiline_bad_value_still_gives_one_line():
    with pytest.raises(SpecError) as info:
        parse_spec(with_(BASE, activation="silu\ngelu"))
    assert "\n" not in str(info.value)
    assert info.value.field == "activation"


# ---- files ----------------------------------------------------------------------------------------


def test_load_spec_reads_yaml(tmp_path):
    import yaml

    p = tmp_path / "full.yaml"
    p.write_text(yaml.safe_dump(FULL, sort_keys=False))
    s = load_spec(p)
    assert s == parse_spec(FULL)
    assert load_spec(str(p)).hash == parse_spec(reversed_mapping(FULL)).hash


def test_load_spec_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(missing)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(missing) in msg
    assert info.value.field == "<file>"


def test_load_spec_directory(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["name: [unclosed\n", "a: b: c\n", "name: tiny\n  bad_indent: 1\n\tx: 2\n"])
def test_load_spec_invalid_yaml(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(p)
    msg = str(info.value)
    assert "\n" not in msg
    assert "YAML" in msg and str(p) in msg
    assert info.value.field == "<file>"


def test_load_spec_empty_file_and_invalid_field(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    with pytest.raises(SpecError) as info:
        load_spec(p)
    assert info.value.field == "<root>"
    p.write_text("name: tiny\ndtype: float32\nhidden_size: 64\nintermediate_size: 32\nnum_experts: 8\n"
                 "top_k: 2\nrouter:\n  scoring: softplus\n")
    with pytest.raises(SpecError) as info:
        load_spec(p)
    assert info.value.field == "router.scoring"


# ---- derived widths --------------------------------------------------------------------------------


@pytest.mark.parametrize("H,L,m,routed,hp,hx", [
    (2880, None, 256, 2880, 3072, 2880),  # gpt-oss-20b: x needs no pad (w13's columns past 2880 are zeros)
    (3072, None, 256, 3072, 3072, 3072),
    (40, None, 1, 40, 40, 40),
    (40, None, 16, 40, 48, 48),
    (300, None, 256, 300, 512, 320),  # x padded to the reduction step (64), not to Hp
    (4096, 1000, 64, 1000, 1024, 1024),  # with a latent transform the kernels see L, not H
    (4096, 1024, 256, 1024, 1024, 1024),
    (7, None, 8, 7, 8, 8),
])
def test_kernel_hidden_and_routed_width(H, L, m, routed, hp, hx):
    s = parse_spec(with_(BASE, hidden_size=H, latent_size=L, padding__hidden_multiple=m))
    assert s.routed_width == routed
    assert s.kernel_hidden == hp
    assert s.kernel_x_width == hx


@pytest.mark.parametrize("I,E,tp,ep,li,le", [(32, 8, 1, 1, 32, 8), (32, 8, 4, 2, 8, 4), (96, 16, 3, 16, 32, 1),
                                             (24, 6, 2, 3, 12, 2)])
def test_local_intermediate_and_experts(I, E, tp, ep, li, le):
    s = parse_spec(with_(BASE, intermediate_size=I, num_experts=E, parallel__tp_size=tp, parallel__ep_size=ep))
    assert s.local_intermediate == li
    assert s.local_experts == le
    assert s.w13_rows == 2 * li
    assert parse_spec(with_(BASE, intermediate_size=I, num_experts=E, parallel__tp_size=tp,
                            activation="relu2")).w13_rows == li


# ---- weights contract -------------------------------------------------------------------------------


def contract(**changes):
    s = parse_spec(with_(BASE, **changes))
    return s, weights_contract(s), weights_contract(s, sharded=True)


def test_contract_gated_plain():
    s, full, shard = contract()
    assert full == {"w13": ((8, 64, 64), "float32"), "w2": ((8, 64, 32), "float32")}
    assert shard == full  # tp = ep = 1


def test_contract_relu2():
    _, full, _ = contract(activation="relu2", dtype="bfloat16")
    assert full == {"w13": ((8, 32, 64), "bfloat16"), "w2": ((8, 64, 32), "bfloat16")}


def test_contract_sharded():
    _, full, shard = contract(parallel__tp_size=4, parallel__ep_size=2, expert_bias=True)
    assert full["w13"] == ((8, 64, 64), "float32") and full["w2"] == ((8, 64, 32), "float32")
    assert shard["w13"] == ((4, 16, 64), "float32")  # El = 8/2, 2*I/tp = 2*32/4
    assert shard["w2"] == ((4, 64, 8), "float32")
    assert full["w13_bias"] == ((8, 64), "float32") and full["w2_bias"] == ((8, 64), "float32")
    assert shard["w13_bias"] == ((4, 16), "float32") and shard["w2_bias"] == ((4, 64), "float32")
    _, _, shard_r = contract(parallel__tp_size=4, parallel__ep_size=2, activation="relu2")
    assert shard_r["w13"] == ((4, 8, 64), "float32")


def test_contract_latent():
    s, full, _ = contract(latent_size=16, padding__hidden_multiple=256)
    # routed experts see L (unpadded: padding is the runner's business), latent_proj maps H -> L
    assert full == {"w13": ((8, 64, 16), "float32"), "w2": ((8, 16, 32), "float32"),
                    "latent_proj": ((16, 64), "float32")}
    assert OPTIONAL_WEIGHTS["gate"](s) == ((8, 16), "float32")
    assert OPTIONAL_WEIGHTS["gate_bias"](s) == ((8,), "float32")


def test_contract_expert_bias_with_latent():
    _, full, _ = contract(latent_size=16, expert_bias=True)
    assert full["w13_bias"] == ((8, 64), "float32")
    assert full["w2_bias"] == ((8, 16), "float32")


@pytest.mark.parametrize("gate", ["none", "sigmoid"])
@pytest.mark.parametrize("act", ["silu", "relu2"])
def test_contract_shared_experts(gate, act):
    _, full, shard = contract(shared_experts={"intermediate_size": 48, "gate": gate}, parallel__tp_size=2,
                              activation=act, latent_size=16, dtype="float16")
    rows = 96 if act != "relu2" else 48
    assert full["shared_w13"] == ((rows, 64), "float16")  # shared experts see H, not L
    assert full["shared_w2"] == ((64, 48), "float16")
    assert shard["shared_w13"] == ((rows // 2, 64), "float16")
    assert shard["shared_w2"] == ((64, 24), "float16")
    if gate == "sigmoid":
        assert full["shared_gate"] == ((1, 64), "float16") and shard["shared_gate"] == ((1, 64), "float16")
    else:
        assert "shared_gate" not in full and "shared_gate" not in shard
    expected = {"w13", "w2", "latent_proj", "shared_w13", "shared_w2"} | ({"shared_gate"} if gate == "sigmoid" else set())
    assert set(full) == expected and set(shard) == expected


def test_contract_correction_bias_is_fp32_and_global():
    _, full, shard = contract(dtype="bfloat16", router__correction_bias=True, parallel__ep_size=4)
    assert full["e_score_correction_bias"] == ((8,), "float32")
    assert shard["e_score_correction_bias"] == ((8,), "float32")  # routing is global: all E scores
    assert shard["w13"] == ((2, 64, 64), "bfloat16")
    _, plain, _ = contract()
    assert "e_score_correction_bias" not in plain


def test_contract_optional_names_absent_by_default():
    _, full, _ = contract()
    for n in ("w13_bias", "w2_bias", "e_score_correction_bias", "latent_proj", "shared_w13", "shared_w2",
              "shared_gate"):
        assert n not in full


def test_spec_type():
    assert isinstance(parse_spec(BASE), MoESpec)


@pytest.mark.parametrize("field,value", [("swiglu_alpha", float("inf")), ("swiglu_limit", float("nan")),
                                         ("router.routed_scaling_factor", float("inf"))])
def test_non_finite_numbers_are_refused(field, value):
    data = {"name": "x", "dtype": "float32", "hidden_size": 8, "intermediate_size": 8, "num_experts": 4, "top_k": 2}
    if "." in field:
        section, key = field.split(".")
        data[section] = {key: value}
    else:
        data[field] = value
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert e.value.field == field and "finite" in str(e.value)


@pytest.mark.parametrize("key,value", [("group_size", 128), ("granularity", "per-tensor"), ("block", [128, 128]),
                                       ("zero_points", True)])
def test_quant_fields_without_a_scheme_are_refused(key, value):
    data = {"name": "x", "dtype": "float32", "hidden_size": 8, "intermediate_size": 8, "num_experts": 4, "top_k": 2,
            "quant": {"scheme": "none", key: value}}
    with pytest.raises(SpecError) as e:
        parse_spec(data)
    assert e.value.field == f"quant.{key}"


def test_mma_configs_are_checked_and_fall_back_where_tensor_cores_cannot_tile():
    """config_ok names what a tensor-core config gets wrong; fit_config keeps mma only where the
    layer's dtype and widths tile into 16x16 fragments (fp32 or irregular test sizes: CUDA cores)."""
    import dataclasses

    from moegen.kernels.experts import ExpertShapes
    from moegen.schedule.config import ExpertsConfig, config_ok, fit_config

    sh = ExpertShapes(dtype="bfloat16", local_experts=8, top_k=2, hidden=256, intermediate=128, activation="silu",
                      swiglu_alpha=1.702, swiglu_limit=7.0, expert_bias=False, weight_on_input=False)
    good = ExpertsConfig(block_m=32, block_n_up=64, block_n_down=64, combine_n=128, mma=True, block_k=32,
                         warp_m=16, warp_n=32)
    assert config_ok(good, sh) is None and fit_config(good, sh).mma
    assert "block_m 24 is not a multiple of 16" in config_ok(dataclasses.replace(good, block_m=24), sh)
    assert "warp_n 48" in config_ok(dataclasses.replace(good, warp_n=48), sh)
    assert "block_k 96 does not divide" in config_ok(dataclasses.replace(good, block_k=96), sh)
    assert "shared memory" in config_ok(dataclasses.replace(good, block_m=128, block_n_up=128, warp_m=64), sh)
    assert "needs float16 or bfloat16" in config_ok(good, dataclasses.replace(sh, dtype="float32"))
    assert not fit_config(good, dataclasses.replace(sh, dtype="float32")).mma
    assert not fit_config(good, dataclasses.replace(sh, hidden=200, intermediate=72)).mma
    # a block_k that divides neither reduction shrinks to a fragment multiple that does (gpt-oss-20b's
    # I 2880 and Hp 3072: gcd 192, block_k 128 -> 96), keeping the tensor cores
    oss = dataclasses.replace(sh, hidden=3072, intermediate=2880)
    fitted = fit_config(dataclasses.replace(good, block_k=128), oss)
    assert fitted.mma and fitted.block_k == 96 and config_ok(fitted, oss) is None
    assert fit_config(dataclasses.replace(good, block_k=64), oss).block_k == 64  # divides: unchanged
    # a tile no layer fits (two stages past 48 KiB of static shared memory) is refused, not run on CUDA cores
    big = dataclasses.replace(good, block_m=32, block_n_up=128, block_n_down=128, block_k=64, stages=2)
    with pytest.raises(AssertionError, match="shared memory"):
        fit_config(big, oss)
    assert fit_config(dataclasses.replace(big, dynamic_smem=True), oss).mma


def test_vector_load_configs_are_checked_and_fitted():
    """vector_loads (GPU decode) needs one row per block and split-K; thread counts stay <= 1024;
    split_k shrinks to a divisor of both reductions, and widths that do not split into 16-byte
    vectors fall back to scalar loads."""
    import dataclasses

    from moegen.kernels.experts import ExpertShapes
    from moegen.schedule.config import ExpertsConfig, config_ok, fit_config

    sh = ExpertShapes(dtype="bfloat16", local_experts=8, top_k=2, hidden=256, intermediate=128, activation="silu",
                      swiglu_alpha=1.702, swiglu_limit=7.0, expert_bias=False, weight_on_input=False)
    good = ExpertsConfig(block_m=1, block_n_up=128, block_n_down=128, combine_n=128, split_k=64, vector_loads=True)
    assert config_ok(good, sh) is None and fit_config(good, sh).vector_loads
    assert "needs block_m 1 and split_k > 1" in config_ok(dataclasses.replace(good, block_m=2), sh)
    assert "<= 1024 threads" in config_ok(dataclasses.replace(good, split_k=128), sh)
    odd = dataclasses.replace(sh, hidden=200, intermediate=72)  # gcd 8: split_k 64 -> 4 (two k steps each)
    fitted = fit_config(good, odd)
    assert fitted.split_k == 4 and config_ok(fitted, odd) is None
    assert not fit_config(good, dataclasses.replace(sh, intermediate=26)).vector_loads  # N13 52: a 52-wide tile
    tp = dataclasses.replace(sh, hidden=160, intermediate=32)  # a TP-2 shard: every thread keeps >= 2 k steps
    assert fit_config(good, tp).split_k == 16
