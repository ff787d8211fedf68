#!/usr/bin/env bash
# On the GPU box (no TVM): `moegen tune run` over prebuilt candidate bundles, from the repo root.
#   scripts/gpu_tune.sh OUT NAME...   each gpu-bundle/tune-NAME.tar.xz (a `moegen tune build` directory,
#   compressed to fit the device carry) is timed at 1-4096 tokens; OUT/NAME.yaml gets the winners, and
#   OUT/tune.tar.gz every schedules file, log and results.json (the device returns at most 8 files).
#   TUNE_TOKENS: other token counts (comma list).
set -u
out=$1; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site gpu-bundle/whl/*.whl
export PYTHONPATH=/tmp/site:.
w=/tmp/tune-results; mkdir -p /tmp/tune "$w/tune"
for n in "$@"; do
  tar xJf "gpu-bundle/tune-$n.tar.xz" -C /tmp/tune
  python3 -m moegen.cli tune run "/tmp/tune/$n" --tokens "${TUNE_TOKENS:-1,16,64,256,1024,4096}" --out "$w/tune/$n.yaml" \
    > "$w/tune/$n.log" 2>&1
  echo "== $n (rc $?)"; grep -v "^  \[" "$w/tune/$n.log" | tail -40
  cp "/tmp/tune/$n/results.json" "$w/tune/$n-results.json"
  tar czf "$out/tune.tar.gz" -C "$w" tune   # after each shape: what finished comes back on a timeout
done
