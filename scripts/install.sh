#!/usr/bin/env bash
# Install syncnorm from this checkout, with the extras named in $1 (e.g. "dev").
# torch is installed only when absent, as the 2.13.0 build: a bare `pip install`
# of a torch requirement would otherwise pull the newest CUDA build (gigabytes).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip --version >/dev/null
python -c 'import torch' 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".${1:+[$1]}"
