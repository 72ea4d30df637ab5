#!/usr/bin/env bash
# One node, N processes (torchrun --standalone --nproc-per-node N).
#
#   launch/single_node.sh RECIPE [--nproc-per-node N] [--max-restarts K] [--run-dir DIR] [--set key=value ...]
#
# N defaults to $NPROC_PER_NODE, else the node's GPU count for a GPU recipe, else 1. The recipe and the
# parallel layout are checked before anything starts (one-line errors). With --max-restarts K a dead
# worker makes torchrun restart the group, which resumes from the run's latest checkpoint.
# --dry-run prints the torchrun command instead of running it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export NNODES=1
unset NODE_RANK
exec "${PYTHON:-python3}" -m lctrain.train.launch "$@"
