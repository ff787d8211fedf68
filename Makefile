# moegen developer entry points. The README's two set-up commands are `make setup` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TARGET ?= cpu-avx512

.PHONY: setup test demo bench clean

# A fresh machine to a working checkout: a virtualenv with every dependency at the pinned version.
# torch first and alone: `pip install torch==2.13.0` takes the CPU build from this box's disk, while a
# looser request would download a multi-GB CUDA build.
setup:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[build,dev]'
	$(BIN)/python -c "import tvm, tvm_ffi, torch, onnx; print('moegen set up: tvm', tvm.__version__, '| torch', torch.__version__)"

test:
	$(BIN)/python -m pytest -q

# The main job: build the bundled example for the CPU, verify it, print the comparison.
demo:
	$(BIN)/moegen build examples/specs/tiny.yaml --target $(TARGET) -o artifacts
	$(BIN)/moegen verify artifacts/tiny/$(TARGET) --tokens 0,1,7,129

bench:
	$(BIN)/moegen bench --target $(TARGET) --json docs/bench-cpu.json

clean:
	rm -rf artifacts/*/ .pytest_cache
