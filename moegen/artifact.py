"""The artifact on disk: manifest schema, file hashes, golden vectors (ONNX TensorProto files).

Build and runtime both use this module, so it imports only the standard library, torch and (lazily) onnx.

    artifacts/<spec name>/<target>/
        manifest.json        format, versions, spec + hash, target, functions, configs, sha256 of files
        moe.so               the kernels (one library: every path, every family)
        libtvm_runtime.so    CPU artifacts: TVM's thread pool for T.parallel (runtime libraries travel with
                             the artifact so a deploy box needs only tvm-ffi and torch)
        golden/test_data_set_<i>/input_<j>.pb, output_<j>.pb   ONNX backend-test layout
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Relative-norm tolerance by dtype: about four units of roundoff of the dtype (the kernels round the
# activation and the output once each), fp32 limited by summation order over wide reductions.
TOLERANCES = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


class ArtifactError(RuntimeError):
    """An artifact that cannot be used here: says which file or field and why."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def read_manifest(root: Path, *, check_hashes: bool = True) -> dict:
    """Load and check a manifest: format version, and the SHA-256 of every file it lists."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST} (not a moegen artifact directory)")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: corrupt manifest ({e})") from None
    if not isinstance(m, dict) or "format_version" not in m:
        raise ArtifactError(f"{mpath}: corrupt manifest (no format_version)")
    if m["format_version"] != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format version {m['format_version']} but this moegen reads "
                            f"{FORMAT_VERSION}; rebuild the artifact")
    for key in ("spec", "spec_hash", "target", "functions", "files", "paths", "library"):
        if key not in m:
            raise ArtifactError(f"{mpath}: corrupt manifest (no '{key}')")
    from .spec import SpecError, spec_from_dict

    try:
        spec_hash = spec_from_dict(m["spec"]).hash
    except SpecError as e:
        raise ArtifactError(f"{mpath}: corrupt manifest (its spec is invalid: {e})") from None
    if spec_hash != m["spec_hash"]:
        raise ArtifactError(f"{mpath}: the spec does not match its hash {m['spec_hash']} (edited manifest; rebuild)")
    unlisted = [f for f in [m["library"], *m.get("runtime_libraries", [])] if f not in m["files"]]
    if unlisted:
        raise ArtifactError(f"{mpath}: corrupt manifest ({unlisted} not among the hashed files)")
    if check_hashes:
        for rel, want in m["files"].items():
            p = root / rel
            if not p.is_file():
                raise ArtifactError(f"{p}: missing (listed in the manifest)")
            got = sha256_file(p)
            if got != want:
                raise ArtifactError(f"{p}: SHA-256 {got[:12]}… does not match the manifest's {want[:12]}… "
                                    "(corrupted or modified; rebuild the artifact)")
    return m


# ---- golden vectors --------------------------------------------------------------------------


def save_tensor(t, path: Path) -> None:
    """fp32 TensorProto (every golden input is exactly representable in fp32; the runner casts)."""
    from onnx import numpy_helper

    path.write_bytes(numpy_helper.from_array(t.float().contiguous().numpy(), name=path.stem).SerializeToString())


def load_tensor(path: Path):
    import torch
    from onnx import TensorProto, numpy_helper

    p = TensorProto()
    p.ParseFromString(Path(path).read_bytes())
    return torch.from_numpy(numpy_helper.to_array(p).copy())


def weights_digest(weights: dict) -> dict[str, str]:
    """SHA-256 of every weight's bytes: proves that a regenerated golden weight set is the built one."""
    import torch

    out = {}
    for name, t in sorted(weights.items()):
        raw = t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(
            {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
        out[name] = hashlib.sha256(raw.numpy().tobytes()).hexdigest()
    return out


# ---- CUDA machine code ------------------------------------------------------------------------

FATBIN_MAGIC = 0xBA55ED50
FATBIN_KINDS = {1: "ptx", 2: "sass"}


def fatbin_entries(so_path: Path) -> list[dict]:
    """The CUDA code a shared library embeds: [{"kind": "sass" | "ptx", "arch": 90}, ...], read from its
    .nv_fatbin ELF section (the layout cuobjdump reads), with no CUDA toolkit or GPU."""
    import struct

    raw = Path(so_path).read_bytes()
    if raw[:4] != b"\x7fELF":
        return []
    shoff, = struct.unpack_from("<Q", raw, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", raw, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", raw, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]
    data = b""
    for name, _type, _flags, _addr, off, size in sections:
        end = raw.index(b"\0", names_off + name)
        if raw[names_off + name:end] == b".nv_fatbin":
            data = raw[off:off + size]
    out, pos = [], 0
    while pos + 16 <= len(data):
        magic, _ver, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            break
        p, end = pos + hsize, pos + hsize + fsize
        while p < end:
            kind, _v, ehsize, padded = struct.unpack_from("<HHIQ", data, p)
            arch = struct.unpack_from("<I", data, p + 28)[0]
            out.append({"kind": FATBIN_KINDS.get(kind, str(kind)), "arch": arch})
            p += ehsize + padded
        pos = end
    return out
