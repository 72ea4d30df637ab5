#!/usr/bin/env bash
# Several nodes: run this same command on every node.
#
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=2 NODE_RANK=<0|1> NPROC_PER_NODE=8 \
#       launch/multi_node.sh RECIPE [--max-restarts K] [--rdzv-id JOB] [--set key=value ...]
#
# torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT (hosted by node 0's agent) joins the nodes;
# every value can also be given as an option (--nnodes, --node-rank, --master-addr, --master-port,
# --nproc-per-node; the command line wins over the environment). The run directory (checkpoints)
# must be on a filesystem every node sees. With --max-restarts K, a failure on any node restarts the
# whole group, which resumes from the latest checkpoint. --dry-run prints the torchrun command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m lctrain.train.launch "$@"
