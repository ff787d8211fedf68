"""targets/*.yaml -> target descriptions and tvm Targets. Always name the architecture: plain "cuda"
silently becomes sm_50 and mcpu native silently falls back to generic (shared/TVM-NOTES.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TARGETS_DIR = Path(__file__).resolve().parents[1] / "targets"


@dataclass(frozen=True)
class TargetInfo:
    name: str  # cpu-avx512, cuda-sm90, ...
    family: str  # cpu | cuda: picks schedule rules and schedules/<family>.yaml
    tvm: dict  # the tvm Target as a dict (strings with options are rejected by TVM 0.27)
    requires_cpu_flags: tuple[str, ...] = ()
    vector_bytes: int = 0
    extra: dict = field(default_factory=dict)

    def tvm_target(self):
        import tvm

        return tvm.target.Target(dict(self.tvm))


def available_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.yaml"))


def load_target(name: str) -> TargetInfo:
    import yaml

    path = TARGETS_DIR / f"{name}.yaml"
    if not path.exists():
        from .spec import SpecError

        raise SpecError("--target", name, " | ".join(available_targets()))
    d = yaml.safe_load(path.read_text())
    known = {"name", "family", "tvm", "requires_cpu_flags", "vector_bytes"}
    return TargetInfo(name=d["name"], family=d["family"], tvm=d["tvm"],
                      requires_cpu_flags=tuple(d.get("requires_cpu_flags", ())),
                      vector_bytes=d.get("vector_bytes", 0),
                      extra={k: v for k, v in d.items() if k not in known})
