"""The `moegen` command: build, verify, inspect, bench (CPU; `--target cuda-*` on a GPU box), bench-plot,
spec from-hf, tune build / tune run.

Exit codes: 0 success; 1 a verification found a mismatch; 2 bad input (spec field, target, artifact,
option), with one line on stderr naming what is wrong and what is allowed; 3 an internal error (a bug:
one line on stderr, the traceback with MOEGEN_DEBUG=1).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from .artifact import ArtifactError
from .spec import SpecError
from .tune import CLOSE_CALL, CONFIRM_GROUP, CONFIRM_ROUNDS


def _fail(msg: str, code: int = 2):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _internal(e: Exception):
    """An error no input explains: exit 3 (1 means a verification mismatch)."""
    import os

    if os.environ.get("MOEGEN_DEBUG"):
        raise e
    _fail(f"internal error: {type(e).__name__}: {e} (rerun with MOEGEN_DEBUG=1 for the traceback)", 3)


def _token_list(value: str) -> list[int]:
    try:
        tokens = [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers >= 0, e.g. 1,7,129") from None
    if not tokens or any(t < 0 for t in tokens):
        raise click.BadParameter(f"{value!r}: expected comma-separated integers >= 0, e.g. 1,7,129")
    return tokens


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moegen")
def main():
    """moegen: ahead-of-time Mixture-of-Experts layers.

    \b
    moegen build spec.yaml --target cpu-avx512 -o artifacts/
    moegen verify artifacts/<name>/cpu-avx512
    moegen inspect artifacts/<name>/cpu-avx512
    """


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--target", "-t", required=True, help="A target from targets/ (cpu-avx512, cpu-x86-64-v3, ...).")
@click.option("--out", "-o", "out_dir", default="artifacts", show_default=True, type=click.Path(file_okay=False),
              help="Artifacts root: the build writes <out>/<spec name>/<target>/.")
@click.option("--no-golden", is_flag=True, help="Skip golden data (reference outputs) in the artifact.")
@click.option("--schedules", "schedules", type=click.Path(dir_okay=False),
              help="A schedules YAML to use instead of schedules/<target>.yaml or schedules/<family>.yaml.")
def build(spec_path, target, out_dir, no_golden, schedules):
    """Build SPEC for a target into an artifact directory (written atomically)."""
    from .schedule.config import ScheduleError
    from .spec import load_spec
    from .targets import available_targets

    try:
        spec = load_spec(spec_path)
    except SpecError as e:
        _fail(str(e))
    if target not in available_targets():
        _fail(f"option '--target': got {target!r}; allowed: {' | '.join(available_targets())}")
    from .build import build as do_build

    t0 = time.perf_counter()
    click.echo(f"building {spec.name} (spec {spec.hash}) for {target}")
    try:
        path = do_build(spec, target, Path(out_dir), golden=not no_golden, schedules=schedules,
                        progress=lambda m: click.echo(f"  {m}  ({time.perf_counter() - t0:.1f} s)"))
    except (ArtifactError, SpecError, ScheduleError) as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - one line, exit 3
        _internal(e)
    click.echo(f"wrote {path} in {time.perf_counter() - t0:.1f} s")


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--tokens", default="1,7,129", show_default=True, callback=lambda c, p, v: _token_list(v),
              help="Token counts for fresh random inputs against the reference.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fresh random inputs.")
@click.option("--no-golden", is_flag=True, help="Skip the artifact's golden vectors.")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:N; auto: the artifact's kind of device.")
def verify(artifact, tokens, seed, no_golden, device):
    """Check an artifact: its golden vectors, then fresh random inputs against the PyTorch reference.

    Prints the relative error per case against the dtype's tolerance; exits 1 on any mismatch.
    """
    from .verify import verify_artifact

    try:
        ok = verify_artifact(Path(artifact), tokens, seed=seed, golden=not no_golden, device=device, echo=click.echo)
    except (ArtifactError, SpecError) as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - one line, exit 3
        _internal(e)
    if not ok:
        click.echo("FAILED: at least one case is over tolerance", err=True)
        sys.exit(1)
    click.echo("all cases within tolerance")


@main.command()
@click.argument("artifact", type=click.Path(file_okay=False))
def inspect(artifact):
    """Show what an artifact holds: spec, target, functions, schedule configs, files, golden data."""
    from .artifact import read_manifest

    try:
        m = read_manifest(Path(artifact))
    except ArtifactError as e:
        _fail(str(e))
    s = m["spec"]
    click.echo(f"{s['name']}  spec {m['spec_hash']}  target {m['target']['name']} {m['target']['tvm']}")
    click.echo(f"  built by moegen {m['moegen_version']} with TVM {m['tvm_version']} in {m.get('build_seconds')} s")
    click.echo(f"  E={s['num_experts']} K={s['top_k']} H={s['hidden_size']} I={s['intermediate_size']} "
               f"dtype={s['dtype']} activation={s['activation']} router={s['router']}")
    if s.get("shared_experts"):
        click.echo(f"  shared experts: {s['shared_experts']}")
    if s.get("latent_size"):
        click.echo(f"  latent size: {s['latent_size']}")
    click.echo("paths (picked by rows per local expert, T*K/El):")
    for p in m["paths"]:
        bound = p["max_rows_per_expert"]
        click.echo(f"  {p['name']:<8} T*K/El <= {bound if bound is not None else 'any':<5} {p['config']}")
    click.echo("functions:")
    for name, args in m["functions"].items():
        sig = ", ".join(f"{a['name']}[{','.join(a['shape'])}]:{a['dtype']}" for a in args)
        click.echo(f"  {name}({sig})")
    click.echo("files:")
    root = Path(artifact)
    for rel, h in m["files"].items():
        click.echo(f"  {rel:<40} {(root / rel).stat().st_size:>10} B  sha256 {h[:12]}")
    g = m.get("golden", {})
    if "sets" in g:
        click.echo(f"golden: seed {g['seed']}, tokens {[x['tokens'] for x in g['sets']]}, tolerance {g['tolerance']}")
    else:
        click.echo(f"golden: none ({g.get('skipped', 'not recorded')})")


@main.group()
def spec():
    """Write specs from other descriptions of a model."""


@spec.command("from-hf")
@click.argument("config_path", metavar="CONFIG.json", type=click.Path(dir_okay=False))
@click.option("--tp", default=1, show_default=True, help="Tensor-parallel size.")
@click.option("--ep", default=1, show_default=True, help="Expert-parallel size.")
@click.option("--name", help="Spec name (default: from the model type).")
@click.option("--out", "-o", "out_path", required=True, type=click.Path(dir_okay=False), help="The spec YAML to write.")
def spec_from_hf(config_path, tp, ep, name, out_path):
    """The MoE layer of a Hugging Face config.json (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, gpt-oss)."""
    import json
    import os
    import tempfile

    import yaml

    from .integrations.hf import spec_from_hf_config
    from .spec import parse_spec

    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except OSError as e:
        _fail(f"{config_path}: cannot read ({e.strerror})")
    except json.JSONDecodeError as e:
        _fail(f"{config_path}: not valid JSON ({e})")
    try:
        data = spec_from_hf_config(cfg, tp=tp, ep=ep, name=name)
        spec_obj = parse_spec(data)  # the written spec is one moegen build accepts
    except SpecError as e:
        _fail(str(e))
    out = Path(out_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
    with os.fdopen(fd, "w") as f:
        f.write(f"# from {config_path} ({cfg.get('model_type')}), spec hash {spec_obj.hash}\n")
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, out)
    click.echo(f"wrote {out} ({spec_obj.name}: E={spec_obj.num_experts} K={spec_obj.top_k} "
               f"H={spec_obj.hidden_size} I={spec_obj.intermediate_size})")


@main.command()
@click.option("--target", "-t", default="cpu-avx512", show_default=True,
              help="Target to benchmark: a CPU target, or cuda-sm90 on a GPU box (prebuilt artifacts, no TVM).")
@click.option("--shapes", default=None,
              help="Comma-separated example specs (examples/specs/<name>.yaml; CUDA: artifact names). "
                   "[default: mixtral-8x7b,qwen3-30b-a3b,gpt-oss-20b; CUDA: + deepseek-v3]")
@click.option("--tokens", default=None, callback=lambda c, p, v: None if v is None else _token_list(v),
              help="Comma-separated token counts. [default: 1,16,128; CUDA: 1,16,64,256,1024,4096]")
@click.option("--out", "-o", "out_dir", default="artifacts", show_default=True, type=click.Path(file_okay=False),
              help="CPU: where the benchmarked artifacts are built (reused when the spec is unchanged).")
@click.option("--artifacts", "artifacts_dir", default="gpu-bundle/artifacts", show_default=True,
              type=click.Path(file_okay=False), help="CUDA: the prebuilt artifacts, <DIR>/<shape>/<target> "
                                                     "(make gpu-bundle); nothing is built on the GPU box.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results as JSON.")
@click.option("--repeats", default=5, show_default=True, help="Timed runs per contender (median reported).")
@click.option("--replays", default=10, show_default=True, help="CUDA: graph replays per repeat.")
@click.option("--triton-configs", default=0, show_default=True,
              help="CUDA: sweep only the first N Triton configs of each token bucket (0: all, 6-7).")
@click.option("--contenders", default=None,
              help="CUDA: a comma-separated subset of moegen,eager,eager_hf,grouped_mm,triton [default: all].")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="CUDA: also write the roofline PNG.")
@click.option("--cache-flush", "--l2-flush", "cache_flush", type=click.Choice(["read", "write"]), default="read",
              show_default=True,
              help="How the cache (CUDA: the L2; CPU: the last level) is emptied before each timed call: read "
                   "(leaves clean lines, as the previous layer's weights) or write (dirty lines, whose write-back "
                   "the timed call pays; CUDA before session 9, CPU before session 10).")
def bench(target, shapes, tokens, out_dir, artifacts_dir, json_path, repeats, replays, triton_configs,
          contenders, plot_path, cache_flush):
    """Time moegen against its baselines, with the floor measured in the same run.

    \b
    CPU: moegen vs the eager PyTorch loop (builds the artifacts).
    cuda-sm90: moegen vs two eager loops, torch._grouped_mm and a Triton fused MoE, under CUDA graphs.
    """
    from .targets import load_target

    try:
        family = load_target(target).family
    except SpecError as e:
        _fail(str(e))
    shape_list = [s for s in shapes.split(",") if s] if shapes else None
    if family == "cuda":
        from .bench_cuda import DEFAULT_SHAPES, DEFAULT_TOKENS, BenchUnavailable, run_bench_cuda

        try:
            run_bench_cuda(target, shape_list or list(DEFAULT_SHAPES), tokens or list(DEFAULT_TOKENS),
                           Path(artifacts_dir), json_path=json_path, plot_path=plot_path, repeats=repeats,
                           replays=replays, triton_configs=triton_configs,
                           contenders=[c for c in contenders.split(",") if c] if contenders else None,
                           l2_flush=cache_flush, echo=click.echo)
        except (ArtifactError, SpecError, BenchUnavailable) as e:
            _fail(str(e))
        return
    from .bench import run_bench

    try:
        run_bench(target, shape_list or ["mixtral-8x7b", "qwen3-30b-a3b", "gpt-oss-20b"], tokens or [1, 16, 128],
                  Path(out_dir), json_path=json_path, repeats=repeats, cache_flush=cache_flush, echo=click.echo)
    except (ArtifactError, SpecError) as e:
        _fail(str(e))


@main.command("bench-plot")
@click.argument("report_path", metavar="BENCH_JSON", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "-o", "out_path", default="roofline.png", show_default=True, type=click.Path(dir_okay=False),
              help="The PNG to write.")
def bench_plot(report_path, out_path):
    """Plot a `moegen bench --target cuda-sm90 --json` result: roofline and % of floor per cell (PNG)."""
    import json

    from .bench_cuda import SCHEMA, plot_report

    try:
        report = json.loads(Path(report_path).read_text())
    except (OSError, ValueError) as e:
        _fail(f"{report_path}: not a JSON file ({e})")
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        _fail(f"{report_path}: not a CUDA bench report (schema {SCHEMA}, from moegen bench --target cuda-sm90 --json)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _fail("bench-plot needs matplotlib: pip install matplotlib (the dev extra pins it)")
    click.echo(f"wrote {plot_report(report, out_path)}")


# ---- tune: candidate schedule configs timed on the device (moegen/tune.py) -----------------------------


@main.group()
def tune():
    """Time candidate schedule configs on the device and write the winners as a schedules file.

    \b
    CPU box (TVM + nvcc):  moegen tune build SPEC --target cuda-sm90 -o TUNE_DIR
    GPU box (torch + tvm-ffi only):
                           moegen tune run TUNE_DIR --out schedules/cuda-sm90.yaml
    """


@tune.command("build")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option("--target", "-t", required=True, help="A target from targets/ (cuda-sm90, cpu-avx512, ...).")
@click.option("--candidates", "candidates_path", type=click.Path(dir_okay=False),
              help="Candidates YAML (base/grid/configs). Default: schedules/candidates/<family>.yaml.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The tune directory: <id>/ per candidate artifact, and candidates.json.")
def tune_build(spec_path, target, candidates_path, out_dir):
    """Build every candidate config that fits SPEC as a one-path artifact (no golden data)."""
    from .schedule.config import ScheduleError
    from .spec import load_spec
    from .targets import available_targets, load_target
    from .tune import CANDIDATES_DIR, TuneError, build_candidates

    try:
        spec_obj = load_spec(spec_path)
    except SpecError as e:
        _fail(str(e))
    if target not in available_targets():
        _fail(f"option '--target': got {target!r}; allowed: {' | '.join(available_targets())}")
    if candidates_path is None:
        candidates_path = CANDIDATES_DIR / f"{load_target(target).family}.yaml"
    t0 = time.perf_counter()
    try:
        doc = build_candidates(spec_obj, target, candidates_path, Path(out_dir), echo=click.echo)
    except (ArtifactError, SpecError, ScheduleError, TuneError) as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - one line, exit 3
        _internal(e)
    click.echo(f"wrote {Path(out_dir) / 'candidates.json'}: {len(doc['candidates'])} candidates "
               f"in {time.perf_counter() - t0:.1f} s")


@tune.command("run")
@click.argument("tune_dir", type=click.Path(file_okay=False))
@click.option("--tokens", default="1,16,64,256,1024,4096", show_default=True,
              callback=lambda c, p, v: _token_list(v), help="Token counts to time (>= 1).")
@click.option("--out", "-o", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The schedules YAML to write (e.g. schedules/cuda-sm90.yaml).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N; auto: the target's kind.")
@click.option("--weights-seed", default=0, show_default=True, help="Seed of the random weights and inputs.")
@click.option("--check-tokens", default="1,33,257", show_default=True, callback=lambda c, p, v: _token_list(v),
              help="Token counts at which every candidate is checked against the reference first.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1, 100),
              help="Timed repeats per cell (median reported).")
@click.option("--confirm-rounds", default=CONFIRM_ROUNDS, show_default=True, type=click.IntRange(0, 50),
              help=f"Rounds of rotating order timing again the candidates within {CLOSE_CALL:.0%} of the "
                   f"fastest (at most {CONFIRM_GROUP}; 0: none).")
def tune_run(tune_dir, tokens, out_path, device, weights_seed, check_tokens, repeats, confirm_rounds):
    """Check and time every candidate of TUNE_DIR; write the winners as a schedules file.

    Needs torch and tvm-ffi only (no apache-tvm). Exits 1 when every candidate is rejected.
    """
    from .tune import AllRejected, TuneError, run_tuning

    try:
        run_tuning(Path(tune_dir), tokens, Path(out_path), device=device, weights_seed=weights_seed,
                   check_tokens=tuple(check_tokens), repeats=repeats, confirm_rounds=confirm_rounds, echo=click.echo)
    except TuneError as e:
        _fail(str(e))
    except AllRejected as e:
        click.echo(f"FAILED: {e}", err=True)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - one line, exit 3
        _internal(e)


if __name__ == "__main__":
    main()
