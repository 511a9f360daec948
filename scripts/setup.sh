#!/usr/bin/env bash
# Create .venv with the CPU build of torch and this project (editable, with the orchestrator and
# test extras). Safe to run again: it only installs what is missing.
#   PYTHON=python3.11 scripts/setup.sh      # pick the interpreter
#   TORCH_SPEC='torch==2.5.1' scripts/setup.sh   # another torch (e.g. the one your platform ships)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($python --version)" >&2
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check)
# Torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on Linux x86_64.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing $torch_spec" >&2
    "${pip[@]}" install --quiet "$torch_spec"
fi
if ! .venv/bin/python -c "import orchestrator, rich, sklearn, pytest, hypothesis, prometheus_client, ray, grpc" 2>/dev/null \
    || [ pyproject.toml -nt .venv/.gapsl-installed ]; then
    echo "setup: installing the project and its extras" >&2
    "${pip[@]}" install --quiet -e ".[orchestrator,dev]"
    touch .venv/.gapsl-installed
fi
# The default manifest holds its example devices' tokens: readable by this user only, as `run`
# asks of any manifest holding tokens (git keeps no mode but the executable bit, so no diff).
chmod 600 testbed.toml
echo "setup: ready (.venv)" >&2
