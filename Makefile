# moegen developer entry points. The README's two set-up commands are `make setup` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TARGET ?= cpu-avx512

.PHONY: setup test demo bench clean gpu-bundle bench-gpu tune-bundle

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

# What a GPU box without TVM needs to check CUDA artifacts (built here, no GPU needed), in parts that each
# fit the device tool's 64 MiB carry: gpu-bundle/whl (cp312 wheels of the runtime's dependencies, 14 MB),
# gpu-bundle/artifacts (the example and scripts/specs artifacts; scripts/specs/ws/ with its own schedules),
# gpu-bundle/hf (the hf-*.yaml specs scripts/hf_gpu_check.py patches models with) and gpu-bundle/whl-hf
# (the transformers wheel).
# On the GPU box, from the repo root:
#   pip install --no-deps --target /tmp/site gpu-bundle/whl/*.whl && PYTHONPATH=/tmp/site:. \
#   python3 scripts/gpu_check.py && python3 scripts/nccl_check.py   (2 GPUs)
#   pip install --no-deps --target /tmp/site gpu-bundle/whl-hf/*.whl && PYTHONPATH=/tmp/site:. \
#   MOEGEN_GPU_ARTIFACTS=gpu-bundle/hf python3 scripts/hf_gpu_check.py
# and the GPU bench (scripts/specs/ holds the real-size shapes it times; see bench-gpu below):
#   PYTHONPATH=/tmp/site:. make bench-gpu PY=python3
GPU_TARGET ?= cuda-sm90
GPU_SPECS := examples/specs/tiny.yaml examples/specs/deepseek-v3-small.yaml examples/specs/gpt-oss-small.yaml \
             examples/specs/latent-small.yaml examples/specs/qwen3-30b-a3b.yaml
WHEELS := apache-tvm-ffi==0.1.14.post1 click==8.5.1 PyYAML==6.0.4 onnx==1.23.2 protobuf==7.36.2 ml_dtypes==0.6.0
HF_WHEELS := transformers==5.24.0
PIP_CP312 := $(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64

gpu-bundle:
	rm -rf gpu-bundle && mkdir -p gpu-bundle/whl gpu-bundle/whl-hf
	for s in $(GPU_SPECS); do $(BIN)/moegen build $$s --target $(GPU_TARGET) -o gpu-bundle/artifacts || exit 1; done
	for s in $$(ls scripts/specs/*.yaml | grep -v '/hf-'); do \
	  $(BIN)/moegen build $$s --target $(GPU_TARGET) -o gpu-bundle/artifacts --no-golden || exit 1; done
	for s in scripts/specs/ws/wgmma-*.yaml; do $(BIN)/moegen build $$s --target $(GPU_TARGET) -o gpu-bundle/artifacts \
	  --no-golden --schedules scripts/specs/ws/schedules.yaml || exit 1; done
	for s in scripts/specs/hf-*.yaml; do $(BIN)/moegen build $$s --target $(GPU_TARGET) -o gpu-bundle/hf --no-golden || exit 1; done
	$(PIP_CP312) -d gpu-bundle/whl $(WHEELS)
	$(PIP_CP312) -d gpu-bundle/whl-hf $(HF_WHEELS)
	du -sh gpu-bundle/*

# On the GPU box (after the set-up above; torch + triton there, no TVM): moegen vs the eager loop,
# torch._grouped_mm and the Triton fused MoE on the prebuilt gpu-bundle/artifacts, under CUDA graphs;
# about 3 minutes on an H100 for 4 shapes x 6 token counts. Narrow it with BENCH_GPU_FLAGS, e.g.
#   make bench-gpu PY=python3 BENCH_GPU_FLAGS="--shapes qwen3-30b-a3b --tokens 1,16"
BENCH_GPU_FLAGS ?=
bench-gpu:
	$(PY) -m moegen.cli bench --target $(GPU_TARGET) --artifacts gpu-bundle/artifacts --json docs/bench-h100.json \
	  --plot docs/bench-h100.png $(BENCH_GPU_FLAGS)

# Tuning the CUDA schedules: every candidate of schedules/candidates/cuda.yaml that fits a real-size spec,
# built here as a one-path artifact (about 1 MB each, 12 candidates) into gpu-bundle/tune/<spec>/ with a
# candidates.json (`moegen tune build`). Run it after gpu-bundle, which starts the bundle afresh:
#   make gpu-bundle tune-bundle            (Mixtral too: TUNE_SPECS="$(TUNE_SPECS) examples/specs/mixtral-8x7b.yaml")
# On the GPU box, after the set-up above (torch + the wheels, no TVM): check every candidate against the
# reference, time it under CUDA graphs, write the winners (Qwen3-30B-A3B: about a minute on an H100):
#   PYTHONPATH=/tmp/site:. python3 -m moegen.cli tune run gpu-bundle/tune/qwen3-30b-a3b \
#     --tokens 1,16,64,256,1024,4096 --out gpu-bundle/tune/qwen3-30b-a3b/cuda-sm90.yaml
# then bring that file back as schedules/cuda-sm90/<shape>.yaml (the name tune run prints: builds of that
# layer shape read it first, then schedules/cuda-sm90.yaml, then cuda.yaml) and keep
# gpu-bundle/tune/<spec>/results.json (every measured time) in docs/tune/ with the performance notes.
TUNE_SPECS ?= examples/specs/qwen3-30b-a3b.yaml
tune-bundle:
	for s in $(TUNE_SPECS); do $(BIN)/moegen tune build $$s --target $(GPU_TARGET) \
	  -o gpu-bundle/tune/$$(basename $$s .yaml) || exit 1; done
	du -sh gpu-bundle/tune/*
