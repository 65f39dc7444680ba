#!/usr/bin/env bash
# The GPU check: bf16 steps of every phase, the attention backend used, sampling both ways, a bf16 checkpoint
# exported to Hugging Face with its logits compared, peak memory against `megannm plan`, and tokens/s and MFU of a
# dense and a MoT step, one line each (under 8 minutes on one GPU). Exits non-zero if any line FAILs.
#   bash tools/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec "${PYTHON:-python3}" -m megannm selfcheck --gpu ${1:+--out "$1"}
