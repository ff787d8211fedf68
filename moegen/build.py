"""spec + target -> IRModule -> compile -> export -> artifact, written atomically.

Shape legend: T tokens (symbolic everywhere), E experts, El local experts, K top-k, Hp padded hidden,
I intermediate per rank.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .artifact import FORMAT_VERSION, MANIFEST, TOLERANCES, hash_files, save_tensor, weights_digest
from .schedule import GRID_WAIT
from .spec import MoESpec
from .targets import TargetInfo, load_target

GOLDEN_TOKENS = (1, 5, 33)
GOLDEN_SEED = 20261126
GOLDEN_WEIGHT_BUDGET = 4 << 30  # bytes of weights regenerated for golden data; larger specs skip it


def expert_shapes(spec: MoESpec):
    from .kernels.experts import ExpertShapes

    return ExpertShapes(dtype=spec.dtype, local_experts=spec.local_experts, top_k=spec.top_k,
                        hidden=spec.kernel_hidden, intermediate=spec.local_intermediate,
                        activation=spec.activation, swiglu_alpha=spec.swiglu_alpha,
                        swiglu_limit=spec.swiglu_limit, expert_bias=spec.expert_bias,
                        weight_on_input=spec.router.apply_weight_on_input,
                        x_width=spec.kernel_x_width)


def schedule_source(target: TargetInfo, schedules: Path | str | None = None,
                    spec: MoESpec | None = None) -> tuple[Path, dict, dict]:
    """The schedules file a build uses (`schedules`, else the one tuned for `spec`'s layer shape
    schedules/<target>/<shape>.yaml, else schedules/<target>.yaml, else schedules/<family>.yaml), its
    checked contents, and what the manifest records of it."""
    from .artifact import sha256_file
    from .schedule.config import SCHEDULES_DIR, read_schedule, schedule_file

    shapes = expert_shapes(spec) if spec is not None else None
    path = Path(schedules) if schedules is not None else schedule_file(target.name, shapes)
    data = read_schedule(path)
    try:
        shown = path.resolve().relative_to(SCHEDULES_DIR.parent).as_posix()
    except ValueError:
        shown = path.name
    return path, data, {"file": shown, "sha256": sha256_file(path), "override": schedules is not None}


def check_schedule(paths, shapes, source: str) -> None:
    """Every path's config, fitted to this layer, must pass config_ok (ScheduleError names the path)."""
    import dataclasses

    from .schedule.config import ScheduleError, config_ok, fit_config

    for i, p in enumerate(paths):
        try:
            why = config_ok(fit_config(p.experts, shapes), shapes)
        except AssertionError as e:
            why = str(e)
        if why is not None:
            raise ScheduleError(f"schedules file {source}: paths[{i}].experts ({p.name}): {why} "
                                f"(config {dataclasses.asdict(p.experts)})")


def scheduled_module(spec: MoESpec, target: TargetInfo, schedule: dict | None = None, source: str | None = None):
    """Every function of the artifact, scheduled: routing, then dispatch/experts_up/experts_down/combine
    per path, then (when the schedules file has a `pack:` section) the weight-packing kernels
    pack_w13_n{BN} / pack_w2_n{BN}, one per packed layout the paths read.
    `schedule`: the contents of a schedules file (default: schedule_source(target)); `source`: its name in
    errors (default: the target's name when `schedule` is given).
    Returns (IRModule, [path dicts for the manifest])."""
    import tvm

    from .kernels import dispatch as kd
    from .kernels import experts as ke
    from .kernels import experts_fused as kf
    from .kernels import experts_wgmma as kw
    from .kernels import pack as kp
    from .kernels import routing as kr
    from .schedule import rules
    from .schedule.config import (RANK_MAX_EXPERTS, ExpertsConfig, ScheduleError, fused_tile, load_paths,
                                  load_routing_config, pack_config, path_records, target_ok)

    rule = rules(target.family)
    shapes = expert_shapes(spec)
    source = source or target.name
    if schedule is None:
        path, schedule, _ = schedule_source(target, spec=spec)
        source = str(path)
    routing_config = load_routing_config(target.name, schedule)
    warps = routing_config.get("warps_per_block", 0)
    rank = routing_config.get("route_dispatch") == "rank" and spec.num_experts <= RANK_MAX_EXPERTS

    def routing(name: str, dispatch: bool = False):
        """routing, or with dispatch the route_dispatch of a path without the sort"""
        if dispatch and rank:  # GPUs, few tokens: a thread block per token, a thread per expert
            return rule.routing_warps(kr.routing_rank_func(spec.num_experts, spec.top_k, spec.router, True), name)
        if warps:  # GPUs: a warp per token (kernels/routing.py)
            return rule.routing_warps(kr.routing_warp_func(
                spec.num_experts, spec.top_k, spec.router, warps, dispatch), name)
        return rule.routing(kr.routing_func(spec.num_experts, spec.top_k, spec.router, dispatch), name)

    funcs = {"routing": routing("routing")}
    configs = load_paths(target.name, schedule)
    check_schedule(configs, shapes, source)
    paths = path_records(configs, shapes)
    for p in paths:
        cfg = ExpertsConfig(**p["config"])
        bm = cfg.block_m
        name = p["name"]
        y_dtype = spec.dtype if cfg.y_model_dtype else "float32"  # the down GEMM's scratch rows
        if not cfg.sort:  # routing writes the dispatch buffers: no dispatch kernel
            if not cfg.fused_routing:  # (a fused kernel that routes its token itself needs no routing kernel)
                funcs[f"route_dispatch_{name}"] = routing(f"route_dispatch_{name}", dispatch=True)
        elif cfg.dispatch_tile:  # GPUs: count, scan and place kernels over tiles of slots (kernels/dispatch.py)
            for part, func in zip(("count", "scan", "place"), kd.dispatch_tiles_funcs(
                    spec.num_experts, spec.local_experts, spec.top_k, bm, cfg.dispatch_threads, cfg.dispatch_tile)):
                funcs[f"dispatch_{part}_{name}"] = rule.dispatch_threads(func, f"dispatch_{part}_{name}")
        elif cfg.dispatch_threads:  # GPUs: one thread block, a thread per expert (kernels/dispatch.py)
            funcs[f"dispatch_{name}"] = rule.dispatch_threads(kd.dispatch_threads_func(
                spec.num_experts, spec.local_experts, spec.top_k, bm, cfg.dispatch_threads), f"dispatch_{name}")
        else:
            funcs[f"dispatch_{name}"] = rule.dispatch(
                kd.dispatch_func(spec.num_experts, spec.local_experts, spec.top_k, bm), f"dispatch_{name}")
        why = target_ok(cfg, target)
        if why is not None:
            raise ScheduleError(f"schedules file {source}: paths ({name}).experts.{why}")
        if cfg.fused:  # GPU decode: one kernel from x to the output (kernels/experts_fused.py)
            tile = fused_tile(cfg, vector_red=bool(target.extra.get("vector_red")))
            router = kr.rank_router(spec.num_experts, spec.top_k, spec.router) if cfg.fused_routing else None
            why = kf.fused_routing_ok(shapes, tile, router) if router is not None else None
            if why is not None:
                raise ScheduleError(f"schedules file {source}: paths ({name}).experts.{why}")
            funcs[f"experts_fused_{name}"] = rule.experts_fused(kf.experts_fused_func(shapes, tile, router),
                                                                f"experts_fused_{name}")
            continue
        if cfg.wgmma:  # Hopper: the kernels name their threads (kernels/experts_wgmma.py)
            up_tile, down_tile = (kw.WgmmaTile(bm, n, cfg.stages, cfg.group_m, cfg.wgmma_span, cfg.warp_specialized,
                                               cfg.wgmma_staged_store)
                                  for n in (cfg.block_n_up, cfg.block_n_down))
            funcs[f"experts_up_{name}"] = rule.experts_wgmma(kw.experts_up_wgmma_func(shapes, up_tile),
                                                             f"experts_up_{name}")
            funcs[f"experts_down_{name}"] = rule.experts_wgmma(kw.experts_down_wgmma_func(shapes, down_tile, y_dtype),
                                                               f"experts_down_{name}")
        else:
            funcs[f"experts_up_{name}"] = rule.experts_up(
                ke.experts_up_func(shapes, bm, cfg.block_n_up, cfg.gather_rows, cfg.grid_blocks, cfg.mma,
                                   cfg.vector_loads, not cfg.sort),
                f"experts_up_{name}", cfg)
            funcs[f"experts_down_{name}"] = rule.experts_down(
                ke.experts_down_func(shapes, bm, cfg.block_n_down, cfg.grid_blocks, cfg.mma, cfg.vector_loads,
                                     not cfg.sort, y_dtype),
                f"experts_down_{name}", cfg)
        funcs[f"combine_{name}"] = rule.combine(ke.combine_func(shapes, bm, not cfg.sort, y_dtype), f"combine_{name}",
                                                cfg)
    pack = pack_config(schedule, source)
    for p in paths if pack is not None else ():  # paths often share a layout: one kernel per width
        up, down = p["config"]["block_n_up"], p["config"]["block_n_down"]
        if f"pack_w13_n{up}" not in funcs:
            funcs[f"pack_w13_n{up}"] = rule.pack(kp.pack_w13_func(
                spec.dtype, shapes.local_experts, shapes.n13, shapes.hidden, up, shapes.gated), f"pack_w13_n{up}", pack)
        if f"pack_w2_n{down}" not in funcs:
            funcs[f"pack_w2_n{down}"] = rule.pack(kp.pack_w2_func(
                spec.dtype, shapes.local_experts, shapes.hidden, shapes.intermediate, down), f"pack_w2_n{down}", pack)
    mod = tvm.IRModule({name: sch.mod[name] for name, sch in funcs.items()})
    return mod, paths


def compile_module(mod, target: TargetInfo):
    """tvm.compile with the lowering pipeline the target family's schedules need.

    CUDA compiles with host "cuda_host": one CUDA C++ translation unit (kernels + tvm-ffi host wrappers
    that launch on the caller's stream) that nvcc turns into machine code ahead of time (export_library).
    """
    import tvm

    if target.family == "cpu":
        from .schedule.lowering import register

        return tvm.compile(mod, target=target.tvm_target(), tir_pipeline=register())
    tvm_target = tvm.target.Target(dict(target.tvm) | {"host": {"kind": "cuda_host"}})
    # use_async_copy: pipelined global -> shared copies become cp.async (schedule.cuda, stages > 1)
    with tvm_target, tvm.transform.PassContext(config={"tirx.use_async_copy": True}):
        return tvm.compile(mod, target=tvm_target)


def _nvcc_flags(target: TargetInfo, arch_specific: bool = False) -> list[str]:
    """SASS for the target's architecture plus PTX of it, so newer GPUs can still load the library.
    arch_specific (wgmma kernels): the "a" variant (sm_90a), whose code runs on that architecture only."""
    arch = target.tvm["arch"].removeprefix("sm_") + ("a" if arch_specific else "")
    return ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
            "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-gencode", f"arch=compute_{arch},code=compute_{arch}"]


# TVM 0.27's CUDA codegen declares its cp.async helpers with `int` element offsets, e.g.
#   __device__ void ptx_cp_async_legacy_cg_16_2_2(void* dst, int dst_off, void* src, int src_off)
# and passes the int64 offset of the global operand through that parameter: past 2**31 elements (a
# DeepSeek-V3 w13 holds 7.5e9) the address wraps and the kernel reads out of bounds (found on the H100:
# an illegal memory access in a pipelined candidate). The offsets are widened before nvcc.
_COPY_HELPER = re.compile(r"(__device__ void ptx_cp_async\w*\(void\* dst, )int( dst_off, void\* src, )int( src_off\))")


def widen_copy_offsets(source: str) -> str:
    """CUDA source with 64-bit offsets in TVM's cp.async helpers (see _COPY_HELPER)."""
    return _COPY_HELPER.sub(r"\1long long\2long long\3", source)


# Programmatic dependent launch (Hopper, PTX griddepcontrol): a kernel of a forward may be launched
# while the one before it on the stream still runs, and waits on the device instead of in the launch
# queue. TVM 0.27's cuda_host codegen refuses its launch flag ("cuda_host does not support launch flag:
# tirx.use_programtic_dependent_launch"), so the build adds it to the translation unit:
#   1. every kernel's first statement waits for the grid before it on the stream to finish and its
#      memory to be visible (griddepcontrol.wait; a no-op after a launch without the flag). Before the
#      wait a kernel touches no memory, and each kernel waits on the one before, so the chain is ordered
#      as without the flag;
#   2. the launch helper sets cudaLaunchAttributeProgrammaticStreamSerialization on every launch (CUDA
#      graph capture keeps it as a programmatic edge): the next grid's launch is prepared while this one
#      runs and starts as it finishes;
#   3. the decode path's kernels (early_trigger) also let the next grid launch right after their wait
#      (griddepcontrol.launch_dependents), so its blocks are resident and waiting when this one ends.
#      Measured on the H100 (docs/perf.md, session 8): at one token that saves 1-2 us a layer, while the
#      same early trigger on the sorted paths' kernels lost 4-9% (gpt-oss-20b at 16 tokens, the
#      warp-specialised layers at 4096), and wait-only (1, 2) was equal or faster in 23 of 24 cells (the
#      24th within that cell's run-to-run spread).
#   4. a kernel that calls GRID_WAIT itself (schedule.cuda._wait_after_first_weights: the decode down
#      GEMV, which loads its first weights before it waits) gets no wait at entry; GRID_WAIT_DEFINITION
#      defines the call in every CUDA source (an empty function where programmatic_launch is off).
GRID_WAIT_DEFINITION = f"__device__ __forceinline__ void {GRID_WAIT}() {{{{{{}}}}}}  // moegen: schedule.GRID_WAIT\n"
_GRID_WAIT_ASM = ' asm volatile("griddepcontrol.wait;" ::: "memory"); '
_KERNEL_ENTRY = re.compile(r'^(extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+?)_kernel(?:_\d+)?\([^;{]*\) \{)$',
                           re.M)
_PDL_WAIT = '\n  asm volatile("griddepcontrol.wait;" ::: "memory");  // moegen: programmatic dependent launch'
_PDL_TRIGGER = '\n  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");'
_LAUNCH_HELPER = "  return cudaLaunchKernelEx(config, kernel, ((Params)args)...);\n"
_PDL_LAUNCH = """  // moegen: programmatic dependent launch (build.add_programmatic_launch)
  cudaLaunchAttribute attrs[8];
  cudaLaunchConfig_t pdl = *config;
  if (pdl.numAttrs >= 8) return cudaErrorInvalidValue;
  for (unsigned i = 0; i < pdl.numAttrs; ++i) attrs[i] = pdl.attrs[i];
  attrs[pdl.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[pdl.numAttrs].val.programmaticStreamSerializationAllowed = 1;
  pdl.attrs = attrs;
  pdl.numAttrs += 1;
  return cudaLaunchKernelEx(&pdl, kernel, ((Params)args)...);
"""


#   5. no kernel reads a buffer that another kernel of the forward writes through a non-coherent load:
#      TVM marks every pointer parameter __restrict__, so nvcc reads the ones a kernel only reads with
#      ld.global.nc, which ptxas takes for constant over the kernel's life and may issue above
#      griddepcontrol.wait (found in session 11: the sorted paths' GEMMs of the small specs read num_blocks
#      above the wait, and a double-buffered decode down GEMV its act). Under programmatic launch the kernel
#      before may still be writing those buffers, so a parameter keeps __restrict__ only if it is in
#      RESTRICT_PARAMS, the weights, biases, expert map and correction bias (set at load, constant over every
#      forward) and x, the layer's input (written before the forward's first kernel, which never reads it,
#      so visible, by the first kernel's wait, before any kernel that reads it launches), or if the kernel
#      stores to it (never loaded non-coherently, and its stores still alias nothing else). Every other
#      read is a coherent load, which ptxas keeps below the wait (tests/test_cuda_build.py reads the SASS).
#      Cost on the H100 (docs/perf.md, session 11): 0-1% at one token and at 256-4096 tokens, up to 4% in the
#      sorted tensor-core paths at 16-64 tokens.
RESTRICT_PARAMS = frozenset({"w13_ptr", "w2_ptr", "w_ptr", "b13_ptr", "b2_ptr", "expert_map_ptr", "bias_ptr", "x_ptr"})
_KERNEL_PARAMS = re.compile(r'^(extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?\w+\()([^)]*)(\))', re.M)
_RESTRICT_PARAM = re.compile(r"(\w+\*) __restrict__ (\w+)")  # (type, name) of a parameter
_STORE_START = re.compile(r"\s*(?:\*\(\w+\*\)\()?(\w+)(?:\[| \+ )")  # a statement that starts name[ | *(T*)(name +
_ASSIGN = re.compile(r"[^=!<>]=[^=]")


def _stored_params(source: str) -> dict[str, set[str]]:
    """{kernel: the __restrict__ parameters its body stores through}. TVM's CUDA codegen writes a store as a
    statement that starts with the buffer (`name[i] = v;`, `*(uint4*)(name + i) = v;`); a load never starts
    one. A store this misses only costs the parameter its __restrict__."""
    stored: dict[str, set[str]] = {}
    for m in _KERNEL_PARAMS.finditer(source):
        if not source.startswith(" {", m.end()):
            continue  # a declaration
        names = {p.group(2) for p in _RESTRICT_PARAM.finditer(m.group(2))}
        body = _body(source, m.end() + 1)
        stored[m.group(1)] = {s.group(1) for line in body.splitlines()
                              if (s := _STORE_START.match(line)) and s.group(1) in names and _ASSIGN.search(line)}
    return stored


def _body(source: str, brace: int) -> str:
    """The text of the block that opens at source[brace] ("{"), to its matching brace; braces inside string
    literals (the PTX of inline asm) do not count."""
    depth, i, quoted = 0, brace, False
    while i < len(source):
        c = source[i]
        if quoted:
            if c == "\\":
                i += 1
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return source[brace:i + 1]
        i += 1
    raise RuntimeError("coherent_chain_reads: a kernel body without its closing brace")


def coherent_chain_reads(source: str) -> str:
    """CUDA source whose kernel parameters (declarations and definitions) keep __restrict__ only where they
    name RESTRICT_PARAMS or a buffer the kernel stores to (never loaded non-coherently, and the compiler
    still knows its stores alias nothing else) (see 5. above)."""
    stored = _stored_params(source)

    def params(m):
        keep = RESTRICT_PARAMS | stored.get(m.group(1), set())
        kept = _RESTRICT_PARAM.sub(lambda p: p.group(0) if p.group(2) in keep else f"{p.group(1)} {p.group(2)}",
                                   m.group(2))
        return m.group(1) + kept + m.group(3)

    return _KERNEL_PARAMS.sub(params, source)


def add_programmatic_launch(source: str, early: frozenset[str] = frozenset()) -> str:
    """CUDA source whose kernels launch with programmatic dependent launch (see _KERNEL_ENTRY); the
    functions named in `early` also trigger the next launch at entry; reads of buffers written within
    the forward are coherent (coherent_chain_reads). Raises when TVM's generated source no longer has the
    launch helper or the kernel entries this rewrites."""
    kernels = len(re.findall(r'^extern "C" __global__ void [^;]*\{$', source, re.M))

    def entry(m):
        waits_inside = f"{GRID_WAIT}();" in _body(source, m.end() - 1)
        return m.group(1) + ("" if waits_inside else _PDL_WAIT) + (_PDL_TRIGGER if m.group(2) in early else "")

    patched, n = _KERNEL_ENTRY.subn(entry, source)
    if n == 0 or n != kernels or source.count(_LAUNCH_HELPER) != 1:
        raise RuntimeError(f"programmatic launch: TVM's CUDA source changed shape ({n} of {kernels} kernel "
                           f"entries, {source.count(_LAUNCH_HELPER)} launch helpers); see build._KERNEL_ENTRY")
    return coherent_chain_reads(patched.replace(_LAUNCH_HELPER, _PDL_LAUNCH))


def early_trigger(paths: list[dict]) -> frozenset[str]:
    """The functions that let the next grid launch at their entry: the decode paths' (vector_loads), those
    the path has (fused: route_dispatch unless it routes itself, and experts_fused)."""
    def kernels(c: dict) -> tuple[str, ...]:
        if c.get("fused"):
            return ("experts_fused",) if c.get("fused_routing") else ("route_dispatch", "experts_fused")
        return ("route_dispatch", "experts_up", "experts_down", "combine")

    return frozenset(f"{fn}_{p['name']}" for p in paths if p["config"].get("vector_loads") for fn in kernels(p["config"]))


def uses_arch_specific(paths: list[dict]) -> bool:
    """Whether any path's kernels need the architecture-specific target (wgmma: sm_90a)."""
    return any(p["config"].get("wgmma") for p in paths)


def export_library(ex, target: TargetInfo, out: Path, arch_specific: bool = False,
                   early: frozenset[str] = frozenset()) -> dict:
    """Write out/moe.so (and, for CUDA, the moe.cu it was compiled from); returns how it was compiled.
    arch_specific: see _nvcc_flags; early: see add_programmatic_launch."""
    if target.family == "cpu":
        ex.export_library(str(out / "moe.so"))
        return {"compiler": "llvm (tvm)"}
    import subprocess

    import tvm_ffi
    from tvm.backend.cuda import export_cuda_host

    source = widen_copy_offsets(export_cuda_host(ex.mod))
    pdl = {}
    source = GRID_WAIT_DEFINITION.format(_GRID_WAIT_ASM if target.extra.get("programmatic_launch") else "") + source
    if target.extra.get("programmatic_launch"):
        source = add_programmatic_launch(source, early)
        pdl = {"programmatic_launch": {"early_trigger": sorted(early)}}
    (out / "moe.cu").write_text(source)
    ffi = Path(tvm_ffi.__file__).parent
    flags = _nvcc_flags(target, arch_specific)
    cmd = ["nvcc", *flags, "-I", str(ffi / "include"), "-o", str(out / "moe.so"), str(out / "moe.cu"),
           "-L", str(ffi / "lib"), "-ltvm_ffi", "-lcudart"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError("nvcc not found: CUDA targets need the CUDA toolkit on the build box (no GPU needed)") from None
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    from .artifact import fatbin_entries

    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    embedded = sorted({(e["kind"], e["arch"]) for e in fatbin_entries(out / "moe.so")})
    return {"compiler": version, "nvcc_flags": flags,
            "embedded": [{"kind": k, "arch": a} for k, a in embedded], **pdl}


def generator_hash() -> str:
    """SHA-256 over the code that decides what an artifact computes and how it is scheduled (the
    kernels, schedule rules and build): two artifacts with equal spec, config and generator hash hold
    the same kernels, so a tuner may reuse one instead of rebuilding it."""
    import hashlib

    pkg = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted([*pkg.glob("kernels/*.py"), *pkg.glob("schedule/*.py"), pkg / "build.py"]):
        h.update(f.relative_to(pkg).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def describe_functions(mod) -> dict:
    """Argument names, shapes (T symbolic) and dtypes of every exported function, for the manifest."""
    import tvm

    out = {}
    for gv, func in mod.functions.items():
        args = []
        for p in func.params:  # TVM 0.27: parameters are buffer-typed vars, or scalars (shape [])
            # constant extents as plain numbers whatever their integer type (some kernels use int64)
            if isinstance(p.ty, tvm.ir.PrimType):
                args.append({"name": p.name, "shape": [], "dtype": str(p.ty)})
                continue
            shape = [str(int(s)) if hasattr(s, "value") else str(s) for s in p.shape]
            args.append({"name": p.name, "shape": shape, "dtype": str(p.dtype)})
        out[gv.name_hint] = args
    return out


def _runtime_libs(target: TargetInfo) -> list[Path]:
    """TVM runtime libraries the artifact carries: CPU kernels use TVM's thread pool (T.parallel)."""
    import tvm

    libdir = Path(tvm.__file__).parent / "lib"
    return [libdir / "libtvm_runtime.so"] if target.family == "cpu" else []


def golden_data(spec: MoESpec, root: Path, tokens=GOLDEN_TOKENS, seed: int = GOLDEN_SEED) -> dict:
    """Reference outputs for seeded weights and inputs, as ONNX TensorProto files under root/golden."""
    import torch

    from .reference import moe_ref, random_weights
    from .spec import weights_contract

    nbytes = sum(torch.Size(s).numel() * torch.tensor([], dtype=getattr(torch, d)).element_size()
                 for s, d in weights_contract(spec).values())
    if nbytes > GOLDEN_WEIGHT_BUDGET:
        return {"skipped": f"weights are {nbytes / 2**30:.1f} GiB, over the golden budget of "
                           f"{GOLDEN_WEIGHT_BUDGET / 2**30:.0f} GiB"}
    weights = random_weights(spec, seed)
    g = torch.Generator().manual_seed(seed + 1)
    dt = getattr(torch, spec.dtype)
    sets = []
    for i, T in enumerate(tokens):
        d = root / "golden" / f"test_data_set_{i}"
        d.mkdir(parents=True)
        x = torch.randn(T, spec.hidden_size, generator=g).to(dt)
        logits = torch.randn(T, spec.num_experts, generator=g) * 2
        ref = moe_ref(spec, weights, x, logits)
        outs = list(ref) if isinstance(ref, tuple) else [ref]
        save_tensor(x, d / "input_0.pb")
        save_tensor(logits, d / "input_1.pb")
        for j, o in enumerate(outs):
            save_tensor(o, d / f"output_{j}.pb")
        sets.append({"dir": f"golden/test_data_set_{i}", "tokens": T,
                     "inputs": ["hidden_states", "router_logits"],
                     "outputs": ["shared_out", "routed_out"] if len(outs) == 2 else ["routed_out"]})
    return {"seed": seed, "weights": "moegen.reference.random_weights(spec, seed)",
            "weights_sha256": weights_digest(weights), "tolerance": TOLERANCES[spec.dtype],
            "metric": "relative L2 norm of the error", "sets": sets}


def build(spec: MoESpec, target_name: str, out_root: Path, *, golden: bool = True,
          progress: Callable[[str], None] = lambda msg: None, schedules: Path | str | None = None) -> Path:
    """Build the artifact at out_root/<spec.name>/<target_name> and return that path.

    `schedules`: a schedules YAML to use instead of the shipped ones (schedule_source) (moegen.schedule.
    config.read_schedule checks it; ScheduleError before anything is written).

    Everything is written into a temporary sibling directory first and renamed into place at the
    end, so a failed build leaves nothing behind and a reader never sees a half-written artifact.
    """
    import tvm

    from .schedule.config import load_paths

    target = load_target(target_name)
    sched_path, sched_data, sched_record = schedule_source(target, schedules, spec)
    check_schedule(load_paths(target.name, sched_data), expert_shapes(spec), str(sched_path))
    final = Path(out_root) / spec.name / target.name
    made_parent = not final.parent.exists()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the artifact is meant to be shared
    try:
        t0 = time.perf_counter()
        progress(f"[1/5] kernels: routing, dispatch, experts, packing (schedules {sched_record['file']})")
        mod, paths = scheduled_module(spec, target, sched_data, sched_record["file"])
        progress(f"[2/5] compiling {len(mod.functions)} functions for {target.tvm}")
        ex = compile_module(mod, target)
        progress("[3/5] exporting the shared library" + (" (nvcc)" if target.family == "cuda" else ""))
        arch_specific = uses_arch_specific(paths)
        compiled = export_library(ex, target, tmp, arch_specific, early_trigger(paths))
        runtime_libs = []
        for lib in _runtime_libs(target):
            shutil.copy2(lib, tmp / lib.name)
            runtime_libs.append(lib.name)
        progress("[4/5] golden data (reference outputs for seeded inputs)" if golden else "[4/5] golden data skipped")
        gold = golden_data(spec, tmp) if golden else {"skipped": "--no-golden"}
        progress("[5/5] manifest")
        manifest = {
            "format_version": FORMAT_VERSION,
            "moegen_version": __version__,
            "tvm_version": tvm.__version__,
            "generator_sha256": generator_hash(),
            "spec": spec.to_dict(),
            "spec_hash": spec.hash,
            "target": {"name": target.name, "family": target.family, "tvm": target.tvm,
                       "requires_cpu_flags": list(target.requires_cpu_flags),
                       "compute_capability": target.extra.get("compute_capability"),
                       # sm_90a code (wgmma) runs on exactly that compute capability, not on newer GPUs
                       "exact_capability": arch_specific},
            "compiled": compiled,
            "library": "moe.so",
            "runtime_libraries": runtime_libs,
            "functions": describe_functions(mod),
            "paths": paths,
            "schedules": sched_record,
            "golden": gold,
            "build_seconds": round(time.perf_counter() - t0, 2),
            "files": hash_files(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent and not any(final.parent.iterdir()):
            final.parent.rmdir()
        raise
    return final


def _replace_dir(new: Path, final: Path) -> None:
    """Swap `new` into `final`: the old artifact (if any) stays whole until the new one is in place."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    new.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
