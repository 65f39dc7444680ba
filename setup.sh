#!/usr/bin/env bash
# Sets up everything megannm needs on a fresh Debian machine (run as root), then runs the embedded default
# (`megannm demo`). `bash setup.sh --no-demo` stops after the installs (CI uses this).
set -euo pipefail
cd "$(dirname "$0")"

run_demo=1
[[ "${1:-}" == "--no-demo" ]] && run_demo=0

SUDO=""
[[ "$(id -u)" != 0 ]] && SUDO="sudo"

# Debian packages: a real Slurm and Open MPI for the launcher tests.
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq slurmctld slurmd slurm-client munge openmpi-bin libopenmpi-dev >/dev/null

# torch first, pinned: the CPU wheel. On a GPU machine, install your CUDA torch before running this script.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
# DS_BUILD_OPS=0: DeepSpeed builds no C++/CUDA ops at install time; megannm never needs them on the CPU.
DS_BUILD_OPS=0 python3 -m pip install -q -e '.[test]'

if [[ $run_demo == 1 ]]; then
  python3 -m megannm demo --out runs/demo
fi
