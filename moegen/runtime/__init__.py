"""The runner side: imports tvm_ffi and torch only, never apache-tvm."""

from ..artifact import ArtifactError
from .runner import MoERunner, RunnerInputError

__all__ = ["MoERunner", "ArtifactError", "RunnerInputError"]
