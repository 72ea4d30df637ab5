#!/usr/bin/env bash
# Install lctrain and everything it needs, from this checkout.
# CPU machines get the pinned CPU build of torch (constraints-cpu.txt): any other torch spec would
# pull a multi-GB CUDA build. A machine that already has a CUDA torch keeps it.
# DeepSpeed is a source package whose build imports torch: build it without isolation, ops off (JIT).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    constraints=()
else
    $PY -m pip install -q torch==2.13.0
    constraints=(-c constraints-cpu.txt)
fi
$PY -m pip install -q setuptools wheel
DS_BUILD_OPS=0 $PY -m pip install -q "${constraints[@]}" --no-build-isolation -e ".[dev]"
$PY -c "import torch, lctrain; print(f'lctrain {lctrain.__version__} installed (torch {torch.__version__})')"
