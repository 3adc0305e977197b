#!/usr/bin/env bash
# One entry point: ./launch.sh install | test
#   install  install the runner and its dependencies into the current Python (idempotent)
#   test     install, then run the test suite on CPU (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

install() {
    if "$PY" -c "import runner, deepspeed, torchvision, transformers.models.gemma4" 2>/dev/null; then
        return
    fi
    if [ "$(uname -m)" = "x86_64" ]; then
        # torch and torchvision that import together (PyPI's torchvision does not import beside the
        # machine's CPU torch 2.13); on the dev/CI machines pip takes both from wheels on disk.
        "$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    fi
    "$PY" -m pip install -q -e ".[test]"
}

run_tests() {
    install
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    "$PY" -m pytest -q tests "$@"
}

cmd=${1:-}
shift || true
case "$cmd" in
    install) install ;;
    test) run_tests "$@" ;;
    *) echo "usage: ./launch.sh install | test [pytest args]" >&2; exit 2 ;;
esac
