#!/usr/bin/env bash
# One entry point for people, CI and the Dockerfile:
#   ./run.sh start   set up .venv, then start the Label Studio ML backend (port 9090)
#   ./run.sh test    set up .venv with the test extra and the test services (a Label Studio
#                    in .venv-label-studio, Chromium), then run the test suite
#   ./run.sh setup   set up only (SEGAL_EXTRAS=test to add the test tools)
#   ./run.sh bench   set up, then print the inference / acquisition benchmark
#   ./run.sh bench-pool   pool scoring through a real Label Studio (tasks/s, x forward, memory)
#   ./run.sh bench-train  training: step time (fp32 / bf16), mIoU per schedule, time to a new version
#   ./run.sh bench-predict  /predict of one task with a trained model vs one plain forward
#   ./run.sh bench-ddp    training step time in 1 and 2 processes (DDP, Gloo) on CPU
#   ./run.sh bench-busy   /predict alone, beside a training process, beside a pool job
#   ./run.sh bench-ranking  task values: the same order under another MC draw? following the errors?
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PYTHON=${PYTHON:-python3}

setup() {
    local extras=${1:-}
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        { echo "Python >= 3.10 is required (found $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2; exit 1; }
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    # Reinstall only when the dependency files changed since the last successful setup.
    local stamp="$VENV/.segal-installed" deps have_deps have_extras
    deps="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
    if [ -f "$stamp" ]; then
        read -r have_deps have_extras <"$stamp" || true
        if [ "$have_deps" = "$deps" ] && { [ -z "$extras" ] || [ "${have_extras:-}" = "$extras" ]; }; then return; fi
    fi
    local target="."
    [ -z "$extras" ] || target=".[$extras]"
    "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e "$target"
    # opencv-python-headless (from label-studio-sdk) and the contrib build share the cv2
    # folder; whichever is installed last wins. Put contrib's files back, then check.
    local contrib
    contrib=$(grep -E '^opencv-contrib-python-headless==' constraints.txt)
    "$VENV/bin/python" -m pip install --quiet --no-deps --force-reinstall "$contrib"
    "$VENV/bin/python" -c 'import cv2; cv2.ximgproc.createSuperpixelSEEDS' ||
        { echo "cv2 lacks SEEDS superpixels: opencv-contrib-python-headless did not install" >&2; exit 1; }
    echo "$deps $extras" >"$stamp"
}

command=${1:-start}
shift || true
case "$command" in
    setup) setup "${SEGAL_EXTRAS:-}" ;;
    start) setup ""; exec "$VENV/bin/segal-backend" "$@" ;;
    test) setup test; scripts/setup-test-services.sh; exec "$VENV/bin/python" -m pytest "$@" ;;
    bench) setup ""; exec "$VENV/bin/segal-benchmark" "$@" ;;
    bench-pool) setup test; scripts/setup-test-services.sh; exec "$VENV/bin/python" scripts/pool_benchmark.py "$@" ;;
    bench-train) setup test; scripts/setup-test-services.sh; exec "$VENV/bin/python" scripts/train_benchmark.py "$@" ;;
    bench-predict) setup test; exec "$VENV/bin/python" scripts/predict_benchmark.py "$@" ;;
    bench-ddp) setup ""; exec "$VENV/bin/python" scripts/ddp_benchmark.py "$@" ;;
    bench-busy) setup test; scripts/setup-test-services.sh; exec "$VENV/bin/python" scripts/busy_benchmark.py "$@" ;;
    bench-ranking) setup test; exec "$VENV/bin/python" scripts/ranking_benchmark.py "$@" ;;
    demo) setup ""; exec "$VENV/bin/segal-demo" "$@" ;;
    *) echo "usage: ./run.sh [start|test|setup|bench|bench-pool|bench-train|bench-predict|bench-ddp|bench-busy|bench-ranking|demo] [args...]" >&2; exit 2 ;;
esac
