"""moegen: ahead-of-time Mixture-of-Experts layers (YAML spec -> TVM TensorIR kernels -> artifact + runner)."""

__version__ = "0.1.0"
