#!/usr/bin/env bash
# Install syncnorm from this checkout, with the extras named in $1 (e.g. "dev").
# torch is installed only when absent, as the 2.13.0 build: a bare `pip install`
# of a torch requirement would otherwise pull the newest CUDA build (gigabytes).
# With the dev extra, the monitoring tests also need Prometheus's promtool and
# server: when promtool is missing, Debian's prometheus package is installed with
# apt-get (as root, or through sudo that asks no password); elsewhere this says
# what to install and goes on, and those tests skip (CI makes them fail instead).
set -euo pipefail
cd "$(dirname "$0")/.."

install_prometheus() {
    command -v promtool >/dev/null && return 0
    local as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            as_root=(sudo -n)
        else
            echo "install.sh: promtool is missing; install Debian's prometheus package as root" >&2
            return 0
        fi
    fi
    if ! command -v apt-get >/dev/null; then
        echo "install.sh: promtool is missing; install Prometheus 2.42 or later (promtool and prometheus)" >&2
        return 0
    fi
    echo "install.sh: installing Debian's prometheus package (promtool and the server, for the tests)" >&2
    ${as_root[@]+"${as_root[@]}"} apt-get update -qq \
        && ${as_root[@]+"${as_root[@]}"} env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
        || echo "install.sh: apt-get could not install prometheus; the monitoring tests need it" >&2
}

python -m pip --version >/dev/null
python -c 'import torch' 2>/dev/null || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".${1:+[$1]}"
case ",${1:-}," in
    *,dev,*) install_prometheus ;;
esac
