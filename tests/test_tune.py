"""`moegen tune` and schedules files: candidates expansion and filtering, winner selection and path
merging on synthetic timings, the written schedules file, `moegen build --schedules`, and the whole loop
on the CPU (tune build -> tune run without apache-tvm -> build with the winners -> verify), including a
candidate with wrong output that must be rejected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import DEFAULT_TARGET, NO_TVM_PRELUDE, SPECS
from moegen import tune
from moegen.artifact import read_manifest, sha256_file
from moegen.build import expert_shapes
from moegen.cli import main
from moegen.runtime.runner import pick_path
from moegen.schedule import config as sc
from moegen.schedule.config import ExpertsConfig, ScheduleError, load_paths, read_schedule
from moegen.spec import load_spec

TINY = load_spec(SPECS / "tiny.yaml")  # H 128, I 96 (N13 192), E 8, K 2
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ExpertsConfig) if f.default is not dataclasses.MISSING}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, code=2) -> str:
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# ---- candidates -----------------------------------------------------------------------------------


def test_candidates_expand_grid_then_configs_over_base_and_defaults():
    data = {"base": {"combine_n": 32, "block_n_down": 64},
            "grid": [{"block_m": [1, 2], "block_n_up": [32, 64]}, {"block_m": 8, "block_n_up": [64]}],
            "configs": [{"block_m": 1, "block_n_up": 32},  # duplicate of the first grid point: dropped
                        {"block_m": 4, "block_n_up": 64, "combine_n": 64}]}
    got = tune.expand_candidates(data, "t")
    want = [(1, 32, 32), (1, 64, 32), (2, 32, 32), (2, 64, 32), (8, 64, 32), (4, 64, 64)]
    assert [(c.block_m, c.block_n_up, c.combine_n) for c in got] == want
    for c in got:  # every field not named keeps ExpertsConfig's default, whatever fields it has
        d = dataclasses.asdict(c)
        assert d["block_n_down"] == 64
        assert {k: v for k, v in d.items() if k not in ("block_m", "block_n_up", "block_n_down", "combine_n")} == \
            {k: v for k, v in DEFAULTS.items() if k not in ("block_m", "block_n_up", "block_n_down", "combine_n")}


@pytest.mark.parametrize("data, names", [
    ({"grid": {"block_mm": [1]}}, "block_mm: unknown field"),
    ({"grid": {"block_m": [1, 0]}, "base": {"block_n_up": 64, "block_n_down": 64, "combine_n": 64}}, "block_m: got 0"),
    ({"configs": [{"block_m": 1, "block_n_up": 64, "block_n_down": 64, "combine_n": 64, "gather_rows": 1}]},
     "gather_rows: got 1"),
    ({"configs": [{"block_m": 1}]}, "missing block_n_up"),
    ({"grid": {"block_m": []}}, "block_m: empty list"),
    ({"grids": {}}, "allowed: base | grid | configs"),
])
def test_candidates_bad_fields_are_named(data, names):
    with pytest.raises(tune.TuneError, match=re.escape(names)) as e:
        tune.expand_candidates(data, "cands.yaml")
    assert "\n" not in str(e.value) and "cands.yaml" in str(e.value)


def test_candidates_filtered_by_config_ok_after_fitting():
    cfgs = [ExpertsConfig(1, 64, 64, 64), ExpertsConfig(1, 128, 64, 64),  # 128 fits to 96 (N13 192)
            ExpertsConfig(2, 64, 64, 64, split_k=5),  # 5 divides neither Hp 128 nor I 96: no fit fixes it
            ExpertsConfig(1, 64, 64, 256)]  # combine_n fits to 128 ...
    kept, rejected = tune.filter_candidates(cfgs + [ExpertsConfig(1, 64, 64, 128)], expert_shapes(TINY))
    assert [k["fitted"]["block_n_up"] for k in kept] == [64, 96, 64]
    assert [k["fitted"]["combine_n"] for k in kept] == [64, 64, 128]
    assert [k["id"] for k in kept] == [tune.candidate_id(k["fitted"]) for k in kept]
    assert len({k["id"] for k in kept}) == 3
    assert len(rejected) == 2
    assert rejected[0]["config"]["split_k"] == 5 and "split_k 5 does not divide" in rejected[0]["why"]
    assert rejected[1]["config"]["combine_n"] == 128 and "same config as candidate " + kept[2]["id"] in rejected[1]["why"]


def test_shipped_candidate_files_fit_the_real_specs():
    # at most 24: about 0.6 MB per CUDA candidate artifact, and a tune bundle of a few shapes must fit the
    # GPU box's 64 MiB carry
    for family, n in (("cuda", 24), ("cpu", 9)):
        cfgs = tune.load_candidates_file(tune.CANDIDATES_DIR / f"{family}.yaml")
        assert len(cfgs) == n <= 24
        for name in ("qwen3-30b-a3b", "mixtral-8x7b"):
            kept, rejected = tune.filter_candidates(cfgs, expert_shapes(load_spec(SPECS / f"{name}.yaml")))
            assert len(kept) == n and not rejected, rejected


# ---- winners and paths (synthetic timings, expectations worked out by hand) ---------------------------


def test_winners_merge_into_paths_with_geometric_bounds():
    tokens = [1, 16, 64, 256, 1024, 4096]  # Qwen3: K 8, El 128 -> rows .0625, 1, 4, 16, 64, 256
    times = {"A": [10, 20, 90, 300, 900, 3000],
             "B": [12, 25, 80, 250, 800, 2500],
             "C": [11, 20, 85, 260, 700, 2600],  # ties A at 16 tokens: A is earlier in the order
             "D": [1e9] * 6}
    winners = tune.pick_winners(times, ["A", "B", "C", "D"])
    assert winners == ["A", "A", "B", "B", "C", "B"]
    paths = tune.merge_paths(tokens, winners, 8, 128)
    assert paths == [
        {"name": "t1_16", "max_rows_per_expert": 2.0, "candidate": "A", "tokens": [1, 16]},  # sqrt(1 * 4)
        {"name": "t64_256", "max_rows_per_expert": 32.0, "candidate": "B", "tokens": [64, 256]},  # sqrt(16 * 64)
        {"name": "t1024", "max_rows_per_expert": 128.0, "candidate": "C", "tokens": [1024]},  # sqrt(64 * 256)
        {"name": "t4096", "max_rows_per_expert": None, "candidate": "B", "tokens": [4096]},
    ]
    recs = [{"name": p["name"], "max_rows_per_expert": p["max_rows_per_expert"]} for p in paths]
    for T, w in zip(tokens, winners):  # the runner's bucket function sends every measured point to its winner
        assert paths[[r["name"] for r in recs].index(pick_path(recs, T, 8, 128)["name"])]["candidate"] == w


def test_close_calls_group_the_candidates_within_the_margin_of_the_fastest():
    """The candidates within CLOSE_CALL of the fastest at a token count, fastest first and at most
    CONFIRM_GROUP, form a group timed again together; a clear winner, or a lone candidate, forms none."""
    from moegen.tune import CLOSE_CALL, close_calls

    times = {"a": [10.0, 100.0, 50.0, 7.0], "b": [10.2, 200.0, 49.0, 7.0], "c": [30.0, 100.0 * (1 + CLOSE_CALL), 49.9, 9.0],
             "d": [10.1, 300.0, 49.5, 9.0]}
    assert close_calls(times, ["a", "b", "c", "d"]) == {("a", "d", "b"): [0], ("a", "c"): [1], ("b", "d", "c"): [2],
                                                        ("a", "b"): [3]}
    assert close_calls(times, ["a", "b", "c", "d"], most=2)[("a", "d")] == [0]
    assert close_calls(times, ["a", "b", "c", "d"], close=0.0) == {("a", "b"): [3]}  # a tie is still a close call
    assert close_calls({"a": [1.0, 2.0]}, ["a"]) == {} and close_calls({}, []) == {}


def test_one_winner_is_one_unbounded_path_and_bounds_round_inside():
    assert tune.merge_paths([1, 7, 33], ["X"] * 3, 2, 8) == \
        [{"name": "t1_33", "max_rows_per_expert": None, "candidate": "X", "tokens": [1, 7, 33]}]
    p = tune.merge_paths([1, 33], ["X", "Y"], 2, 8)  # rows .25 and 8.25: sqrt(2.0625) = 1.436...
    assert p[0]["max_rows_per_expert"] == 1.44
    p = tune.merge_paths([1000, 1001], ["X", "Y"], 1, 1)  # 3 or 4 digits would round onto the lower point
    assert p[0]["max_rows_per_expert"] == 1000.5
    with pytest.raises(ValueError):
        tune.merge_paths([16, 1], ["X", "Y"], 1, 1)


def test_written_schedule_loads_and_round_trips(tmp_path):
    a = dataclasses.asdict(ExpertsConfig(1, 64, 64, 128, split_k=4))
    b = dataclasses.asdict(ExpertsConfig(8, 128, 64, 128))
    paths = tune.merge_paths([1, 16, 64, 256], ["a", "a", "b", "b"], 8, 128)
    text = tune.schedule_yaml(paths, {"a": a, "b": b}, {"warps_per_block": 4}, ["a header", ""], {"t1_16": "a note"},
                              pack={"tile_k": 64, "tile_n": 32, "vector_bytes": 16})
    f = tmp_path / "cuda-sm90.yaml"
    f.write_text(text)
    data = read_schedule(f)
    got = load_paths("cuda-sm90", data)
    assert [(p.name, p.max_rows_per_expert, dataclasses.asdict(p.experts)) for p in got] == \
        [("t1_16", 2.0, a), ("t64_256", None, b)]
    assert sc.load_routing_config("cuda-sm90", data) == {"warps_per_block": 4}
    assert sc.pack_config(data, "f") == sc.PackConfig(tile_k=64, tile_n=32)
    assert text.startswith("# a header\n#\npaths:\n") and "  - name: t1_16    # a note\n" in text
    # what was read, written again, is the same file
    again = tune.schedule_yaml([dict(q, candidate=q["name"]) for q in paths],
                               {p.name: dataclasses.asdict(p.experts) for p in got}, data["routing"],
                               ["a header", ""], {"t1_16": "a note"}, pack=data["pack"])
    assert again == text


# ---- schedules files: lookup and checks -------------------------------------------------------------------


def test_schedule_lookup_prefers_the_target_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sc, "SCHEDULES_DIR", tmp_path)
    (tmp_path / "cpu.yaml").write_text("paths: [{name: a, max_rows_per_expert: null, "
                                       "experts: {block_m: 1, block_n_up: 64, block_n_down: 64, combine_n: 64}}]\n")
    assert sc.schedule_file(DEFAULT_TARGET) == tmp_path / "cpu.yaml"
    assert sc.schedule_file("cpu") == tmp_path / "cpu.yaml"
    (tmp_path / f"{DEFAULT_TARGET}.yaml").write_text(
        "paths: [{name: b, max_rows_per_expert: null, experts: {block_m: 2, block_n_up: 32, block_n_down: 32, "
        "combine_n: 32}}]\nrouting: {warps_per_block: 2}\n")
    assert sc.schedule_file(DEFAULT_TARGET) == tmp_path / f"{DEFAULT_TARGET}.yaml"
    assert [p.name for p in load_paths(DEFAULT_TARGET)] == ["b"]
    assert [p.name for p in load_paths("cpu")] == ["a"]
    assert sc.load_routing_config(DEFAULT_TARGET) == {"warps_per_block": 2}


def test_shipped_schedules_pass_the_checks():
    for f in sorted(sc.SCHEDULES_DIR.glob("*.yaml")):
        assert load_paths(f.stem, read_schedule(f))


GOOD_EXPERTS = "{block_m: 1, block_n_up: 64, block_n_down: 64, combine_n: 64}"


@pytest.mark.parametrize("text, names", [
    (f"paths: [{{name: a, max_rows_per_expert: null, experts: {GOOD_EXPERTS[:-1]}, blockm: 2}}}}]",
     "paths[0].experts.blockm: unknown field; allowed: block_m | "),
    ("paths: [{name: a, max_rows_per_expert: null, experts: {block_m: 1, block_n_up: 64.5, block_n_down: 64, "
     "combine_n: 64}}]", "paths[0].experts.block_n_up: got 64.5; allowed: an integer >= 1"),
    (f"paths: [{{name: a, max_rows_per_expert: 2, experts: {GOOD_EXPERTS}}}]",
     "paths[0].max_rows_per_expert: got 2; the last path must be null"),
    (f"paths: [{{name: a, max_rows_per_expert: 4, experts: {GOOD_EXPERTS}}}, "
     f"{{name: b, max_rows_per_expert: 2, experts: {GOOD_EXPERTS}}}, {{name: c, max_rows_per_expert: null, "
     f"experts: {GOOD_EXPERTS}}}]", "paths[1].max_rows_per_expert: got 2; allowed: a number > 4"),
    (f"paths: [{{name: a-b, max_rows_per_expert: null, experts: {GOOD_EXPERTS}}}]", "paths[0].name: got 'a-b'"),
    (f"paths: [{{name: a, max_rows_per_expert: null, experts: {GOOD_EXPERTS}}}]\nroutin: {{}}", "unknown section 'routin'"),
    ("paths: [{name: a, max_rows_per_expert: null, experts: {block_m: 1}}]", "paths[0].experts: missing block_n_up"),
    (f"paths: [{{name: a, max_rows_per_expert: null, experts: {GOOD_EXPERTS}}}]\npack: {{tile_k: 64, tile: 64}}",
     "pack.tile: unknown field; allowed: tile_k | tile_n | vector_bytes"),
    (f"paths: [{{name: a, max_rows_per_expert: null, experts: {GOOD_EXPERTS}}}]\npack: {{tile_k: 64}}",
     "pack: missing tile_n"),
    (f"paths: [{{name: a, max_rows_per_expert: null, experts: {GOOD_EXPERTS}}}]\npack: {{tile_k: 48, tile_n: 64}}",
     "pack: tile_k 48 must be a power of two"),
    (f"paths: [{{name: a, max_rows_per_expert: null, experts: {GOOD_EXPERTS}}}]\npack: {{tile_k: 64, tile_n: 64, "
     "vector_bytes: 32}", "pack: vector_bytes 32 > 16"),
    (f"paths: [{{name: a, max_rows_per_expert: null, experts: {GOOD_EXPERTS}}}]\nrouting: {{warps_per_block: 4, "
     "route_dispatch: ranks}", "routing.route_dispatch: got 'ranks'; allowed: warps | rank"),
    (f"paths: [{{name: a, max_rows_per_expert: null, experts: {GOOD_EXPERTS}}}]\nrouting: {{route_dispatch: rank}}",
     "routing.route_dispatch: rank is a GPU kernel (a thread block per token); it needs warps_per_block > 0"),
    ("paths: [unclosed", "not valid YAML"),
    ("{}", "expected a non-empty `paths:` list"),
])
def test_bad_schedules_file_fails_build_with_one_line(tmp_path, text, names):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    with pytest.raises(ScheduleError, match=re.escape(names)):
        read_schedule(f)
    out = tmp_path / "out"
    line = one_line_error(invoke("build", SPECS / "tiny.yaml", "-t", DEFAULT_TARGET, "-o", out, "--schedules", f))
    assert str(f) in line and names in line
    assert not out.exists()


def test_schedules_config_ok_failure_names_the_field(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("paths: [{name: a, max_rows_per_expert: null, experts: {block_m: 1, block_n_up: 64, "
                 "block_n_down: 64, combine_n: 64, split_k: 5}}]\n")
    out = tmp_path / "out"
    line = one_line_error(invoke("build", SPECS / "tiny.yaml", "-t", DEFAULT_TARGET, "-o", out, "--schedules", f))
    assert "paths[0].experts (a): split_k 5 does not divide" in line
    missing = one_line_error(invoke("build", SPECS / "tiny.yaml", "-t", DEFAULT_TARGET, "-o", out,
                                    "--schedules", tmp_path / "nope.yaml"))
    assert "nope.yaml" in missing
    assert not out.exists()


def test_default_build_records_its_schedules_file(artifact):
    m = read_manifest(artifact("tiny"))
    f = sc.schedule_file(DEFAULT_TARGET)
    assert m["schedules"] == {"file": f"schedules/{f.name}", "sha256": sha256_file(f), "override": False}


# ---- the whole loop on the CPU ------------------------------------------------------------------------

CANDIDATES = """
base: {block_n_down: 64, combine_n: 64}
grid: {block_m: [1, 8], block_n_up: 64}
configs:
  - {block_m: 2, block_n_up: 32}
  - {block_m: 2, block_n_up: 32, split_k: 5}   # config_ok: 5 divides neither Hp 128 nor I 96
"""

RUN_CHILD = NO_TVM_PRELUDE + textwrap.dedent(r'''
    from moegen.cli import main

    try:
        main(sys.argv[1:])
    except SystemExit as e:
        assert "tvm" not in sys.modules, "tune run imported apache-tvm"
        raise
''')


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """`tune build` of three tiny candidates (one more skipped), then `tune run --device cpu` in a process
    where apache-tvm cannot be imported. Returns (tune_dir, schedules file, stdout of the run)."""
    root = tmp_path_factory.mktemp("tune")
    cands = root / "cands.yaml"
    cands.write_text(CANDIDATES)
    r = invoke("tune", "build", SPECS / "tiny.yaml", "-t", DEFAULT_TARGET, "--candidates", cands, "-o", root / "td")
    assert r.exit_code == 0, r.output
    assert "split_k 5 does not divide" in r.output and "3 candidates for tiny" in r.output
    script = root / "child.py"
    script.write_text(RUN_CHILD)
    out = root / "tuned.yaml"
    p = subprocess.run([sys.executable, str(script), "tune", "run", str(root / "td"), "--device", "cpu",
                        "--tokens", "1,33", "--check-tokens", "1,33", "--repeats", "3", "-o", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=root)
    assert p.returncode == 0, p.stdout + p.stderr
    return root / "td", out, p.stdout


def test_tune_build_writes_one_path_artifacts(tuned):
    td, _, _ = tuned
    doc = json.loads((td / "candidates.json").read_text())
    assert doc["target"] == DEFAULT_TARGET and doc["spec_name"] == "tiny" and len(doc["candidates"]) == 3
    assert [r["config"]["split_k"] for r in doc["rejected"]] == [5]
    for c in doc["candidates"]:
        m = read_manifest(td / c["artifact"])
        assert c["artifact"].startswith(c["id"] + "/")
        assert m["paths"] == [{"name": "tuned", "max_rows_per_expert": None, "config": c["fitted"]}]
        assert m["golden"] == {"skipped": "--no-golden"} and m["schedules"]["override"] is True
    # a second build reuses every artifact
    r = invoke("tune", "build", SPECS / "tiny.yaml", "-t", DEFAULT_TARGET, "--candidates", td.parent / "cands.yaml",
               "-o", td)
    assert r.exit_code == 0 and r.output.count(" reused ") == 3, r.output


def test_tune_run_writes_winners_that_build_and_verify(tuned, tmp_path):
    td, sched, stdout = tuned
    res = json.loads((td / "results.json").read_text())
    assert res["tokens"] == [1, 33] and res["rows_per_expert"] == [0.25, 8.25]
    # where to ship it (the GPU box has no TVM: the key comes from the spec alone, as builds compute it)
    assert f"schedules/{DEFAULT_TARGET}/{sc.shape_key(expert_shapes(TINY))}.yaml" in stdout
    assert all(r["status"] == "ok" and len(r["times_us"]) == 2 and r["error"] < res["tolerance"]
               for r in res["candidates"].values())
    # close calls of the first pass were timed again together, which ordered each group
    from moegen.tune import close_calls

    first = {c: r.get("first_pass_us", r["times_us"]) for c, r in res["candidates"].items()}
    groups = close_calls(first, list(res["candidates"]))
    assert res["confirm_rounds"] == 5 and {c for group in groups for c in group} == \
        {c for c, r in res["candidates"].items() if "head_to_head_us" in r}
    for group, cols in groups.items():
        for j in cols:
            _assert_head_to_head(res["candidates"], group, j, res["tokens"][j], 5)
        assert f"head to head at T={res['tokens'][cols[0]]}" in stdout
    def layout(r):
        return r["config"]["block_n_up"], r["config"]["block_n_down"]

    chosen = {layout(res["candidates"][w]) for w in res["winners"].values()}
    assert len(chosen) == 1  # one packed weight layout for every path
    for j, T in enumerate(res["tokens"]):  # the winner is the fastest of that layout, marked in the table
        w = res["winners"][str(T)]
        same = [r for r in res["candidates"].values() if layout(r) in chosen]
        assert res["candidates"][w]["times_us"][j] == min(r["times_us"][j] for r in same)
        assert f"{res['candidates'][w]['times_us'][j]:.1f}*" in stdout
    want = [(p["name"], p["max_rows_per_expert"], res["candidates"][p["candidate"]]["config"]) for p in res["paths"]]
    assert want[-1][1] is None and [w for w in res["winners"].values()] == \
        [p["candidate"] for p in res["paths"] for _ in p["tokens"]]
    r = invoke("build", SPECS / "tiny.yaml", "-t", DEFAULT_TARGET, "-o", tmp_path, "--schedules", sched)
    assert r.exit_code == 0, r.output
    art = tmp_path / "tiny" / DEFAULT_TARGET
    m = read_manifest(art)
    assert [(p["name"], p["max_rows_per_expert"], p["config"]) for p in m["paths"]] == want
    assert m["schedules"] == {"file": sched.name, "sha256": sha256_file(sched), "override": True}
    r = invoke("verify", art, "--tokens", "1,7,33,129")
    assert r.exit_code == 0 and "all cases within tolerance" in r.output, r.output


def _assert_head_to_head(cands: dict, group: tuple, j: int, T: int, rounds: int) -> None:
    """A group's times at token index j: the fastest by its rounds' median keeps the group's best first-pass
    time, each other that times its ratio to it (the other candidates were timed in the first pass)."""
    med = {c: statistics.median(cands[c]["head_to_head_us"][str(T)]) for c in group}
    assert all(len(cands[c]["head_to_head_us"][str(T)]) == rounds for c in group)
    lead = min(group, key=lambda c: med[c])
    base = min(cands[c]["first_pass_us"][j] for c in group)
    for c in group:
        assert cands[c]["times_us"][j] == pytest.approx(base * med[c] / med[lead], rel=1e-12)


def test_close_calls_are_timed_again_head_to_head(tuned, tmp_path, monkeypatch):
    """With a margin of 10x every candidate is a close call: each token count's group (all three) is timed again
    in rotated rounds, which order it (_assert_head_to_head); the first pass is kept, the winners are chosen
    by the new times; --confirm-rounds 0 times nothing again."""
    import shutil

    from moegen import tune

    td = tmp_path / "td"
    shutil.copytree(tuned[0], td)
    monkeypatch.setattr(tune, "CLOSE_CALL", 10.0)
    lines = []
    res = tune.run_tuning(td, [1, 33], tmp_path / "s.yaml", device="cpu", check_tokens=(1,), repeats=2,
                          confirm_rounds=3, echo=lines.append)
    cands = res["candidates"]
    groups = tune.close_calls({c: r["first_pass_us"] for c, r in cands.items() if "first_pass_us" in r}
                             | {c: r["times_us"] for c, r in cands.items() if "first_pass_us" not in r}, list(cands), 10.0)
    assert sorted(j for cols in groups.values() for j in cols) == [0, 1]  # both token counts re-timed
    for group, cols in groups.items():
        for j in cols:
            _assert_head_to_head(cands, group, j, res["tokens"][j], 3)
    assert sum("head to head at T=" in line for line in lines) == 2
    def layout(r):
        return r["config"]["block_n_up"], r["config"]["block_n_down"]

    for j, T in enumerate(res["tokens"]):  # the fastest by the new times, of the one weight layout chosen
        w = cands[res["winners"][str(T)]]
        assert w["times_us"][j] == min(r["times_us"][j] for r in cands.values() if layout(r) == layout(w))
    none = tune.run_tuning(td, [1], tmp_path / "s2.yaml", device="cpu", check_tokens=(1,), repeats=2,
                           confirm_rounds=0, echo=lambda _: None)
    assert not any("head_to_head_us" in r for r in none["candidates"].values())


def test_a_candidate_with_wrong_output_is_rejected_never_chosen(tuned, tmp_path, monkeypatch):
    """One candidate returns garbage at once: the fastest by far, so only the check keeps it out."""
    from moegen.runtime import MoERunner

    td, _, _ = tuned
    doc = json.loads((td / "candidates.json").read_text())
    bad = doc["candidates"][1]["id"]
    real = MoERunner.forward

    def forward(self, hidden_states, router_logits=None, **kw):
        if bad in str(self.root):
            return hidden_states.new_ones(hidden_states.shape[0], self.spec.routed_width)
        return real(self, hidden_states, router_logits, **kw)

    monkeypatch.setattr(MoERunner, "forward", forward)
    out = tmp_path / "s.yaml"
    lines = []
    res = tune.run_tuning(td, [1, 33], out, device="cpu", check_tokens=(1, 33), repeats=1, echo=lines.append)
    assert res["candidates"][bad]["status"] == "rejected" and "relative error" in res["candidates"][bad]["why"]
    assert bad not in res["winners"].values() and bad not in json.dumps(res["paths"])
    assert any(ln.startswith(bad) and "rejected" in ln for ln in lines)  # reported in the table
    assert any(f"{bad}: REJECTED" in ln for ln in lines)
    assert {dataclasses.asdict(p.experts)["block_m"] for p in load_paths("x", read_schedule(out))} <= \
        {c["fitted"]["block_m"] for c in doc["candidates"] if c["id"] != bad}


def test_every_candidate_wrong_exits_1_and_writes_no_schedule(tuned, tmp_path, monkeypatch):
    from moegen.runtime import MoERunner

    monkeypatch.setattr(MoERunner, "forward", lambda self, x, logits=None, **kw: x.new_zeros(x.shape[0], 128) * math.nan)
    out = tmp_path / "s.yaml"
    r = invoke("tune", "run", tuned[0], "--device", "cpu", "--tokens", "1", "--check-tokens", "1", "-o", out)
    assert r.exit_code == 1 and "every candidate was rejected" in r.stderr, r.output
    assert not out.exists()


def test_tune_bad_input_exits_2_with_one_line(tuned, tmp_path):
    td = tuned[0]
    assert "no candidates.json" in one_line_error(invoke("tune", "run", tmp_path, "-o", tmp_path / "s.yaml"))
    line = one_line_error(invoke("tune", "run", td, "--device", "cuda", "-o", tmp_path / "s.yaml"))
    assert "option '--device'" in line
    bad = tmp_path / "c.yaml"
    bad.write_text("grid: {block_m: [1], blok_n_up: [64]}\n")
    line = one_line_error(invoke("tune", "build", SPECS / "tiny.yaml", "-t", DEFAULT_TARGET, "--candidates", bad,
                                 "-o", tmp_path / "td"))
    assert "blok_n_up: unknown field" in line
    bad.write_text("configs: [{block_m: 1, block_n_up: 64, block_n_down: 64, combine_n: 64, split_k: 7}]\n")
    line = one_line_error(invoke("tune", "build", SPECS / "tiny.yaml", "-t", DEFAULT_TARGET, "--candidates", bad,
                                 "-o", tmp_path / "td"))
    assert "no candidate fits tiny" in line
    assert not (tmp_path / "td" / "candidates.json").exists()


def test_winners_share_one_weight_layout():
    """The runner packs weights once per (block_n_up, block_n_down): winners come from the layout
    closest to the unrestricted best, so a tuned schedule never makes the runner hold two copies."""
    times = {"A": [10, 50, 500], "B": [12, 20, 100], "C": [30, 21, 90]}
    assert tune.pick_winners(times, ["A", "B", "C"]) == ["A", "B", "C"]
    layout = {"A": (128, 64), "B": (128, 128), "C": (128, 128)}
    # (128, 128): ratios 1.2, 1, 1 beat (128, 64): 1, 2.5, 5.6
    assert tune.pick_winners(times, ["A", "B", "C"], layout) == ["B", "B", "C"]
    layout = {"A": (64, 64), "B": (64, 64), "C": (128, 128)}
    assert tune.pick_winners(times, ["A", "B", "C"], layout) == ["A", "B", "B"]


def test_shipped_gpu_schedules_keep_one_weight_layout():
    """The runner packs weights once per (block_n_up, block_n_down): every shipped CUDA schedule uses
    one, so a GPU holds a layer's weights once (the CPU file's prefill tile differs: two copies)."""
    from moegen.schedule.config import SCHEDULES_DIR, load_paths

    from moegen.schedule.config import read_schedule

    files = sorted(SCHEDULES_DIR.glob("cuda*.yaml")) + sorted(SCHEDULES_DIR.glob("cuda*/*.yaml"))
    assert len(files) > 3  # the family file, sm90's and its per-shape files
    for f in files:
        layouts = {(p.experts.block_n_up, p.experts.block_n_down) for p in load_paths(f.stem, read_schedule(f))}
        assert len(layouts) == 1, (f.name, layouts)


def test_builds_read_the_schedules_tuned_for_their_layer_shape(tmp_path):
    """schedules/<target>/<shape_key>.yaml (tune run's output for that layer) comes before the target's
    file; every shipped one is named after the shape of a spec in examples/ or scripts/specs/, and a
    build of that spec records it in the manifest."""
    from moegen.build import expert_shapes, schedule_source
    from moegen.schedule.config import SCHEDULES_DIR, schedule_file, shape_key
    from moegen.targets import available_targets, load_target

    shipped = sorted(f for t in available_targets() for f in (SCHEDULES_DIR / t).glob("*.yaml"))
    assert shipped
    specs = {shape_key(expert_shapes(load_spec(f))): f for d in (SPECS, SPECS.parent.parent / "scripts" / "specs")
             for f in sorted(d.glob("*.yaml"))}
    for f in shipped:
        assert f.stem in specs, f"{f.relative_to(SCHEDULES_DIR)} names no example layer shape"
        spec = load_spec(specs[f.stem])
        assert schedule_file(f.parent.name, expert_shapes(spec)) == f
        path, _, record = schedule_source(load_target(f.parent.name), spec=spec)
        assert path == f and record["file"] == f"schedules/{f.parent.name}/{f.name}"
    tiny = expert_shapes(load_spec(SPECS / "tiny.yaml"))
    assert schedule_file("cuda-sm90", tiny) == SCHEDULES_DIR / "cuda-sm90.yaml"
    assert schedule_file("cuda-sm80", tiny) == SCHEDULES_DIR / "cuda.yaml"
