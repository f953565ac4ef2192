#!/usr/bin/env bash
# One device check of the engine on a lent H200 (see bench/gpu_check.py for what it measures).
#
# The lead's call (device tool `run`; nothing to carry, no wheels: torch, transformers, peft, pytest, pytest-xdist
# and pytest-timeout are in the GPU image; models are random, built from bench/gpu_assets' config):
#   run(command="bash bench/gpu_check.sh", timeout_s=540)
# The check stops itself after ~470 s (per-part timeouts), so 540 leaves room for the start and the copy back.
# $OUT gets gpu_check.md, gpu_check.json, gpu_check.log and pytest.txt.
#
# Here, on a CPU, end to end with tiny models and 2 steps:
#   PY=/work/main/.venv/bin/python bash bench/gpu_check.sh --dry
# Extra arguments go to the driver, e.g. --parts methods,compare or --tests tests/test_train.py.
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
PY="${PY:-python3}"
"$PY" -m bench.gpu_check --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu_check.console.txt"
rc=${PIPESTATUS[0]}
echo "gpu_check exit $rc; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$rc"
