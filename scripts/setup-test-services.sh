#!/usr/bin/env bash
# Installs what the end-to-end tests start themselves: a real Label Studio in its own virtual
# env (.venv-label-studio, never the project .venv: it pins versions that conflict with ours)
# and Debian's headless Chromium plus its matching chromedriver (so selenium never downloads a
# driver). Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

LS_VERSION=1.23.2
LS_VENV=.venv-label-studio
PYTHON=${PYTHON:-python3}

LS_CONSTRAINTS=scripts/label-studio-constraints.txt

# Label Studio: reinstall only when the binary is missing or the stamp names another version
# or other pins of its dependencies (LS_CONSTRAINTS: its own unpinned dependencies have broken it).
stamp="$LS_VENV/.label-studio-version"
want="$LS_VERSION $(sha256sum "$LS_CONSTRAINTS" | cut -d' ' -f1)"
if [ -x "$LS_VENV/bin/label-studio" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    echo "label-studio $LS_VERSION: already in $LS_VENV"
else
    echo "label-studio $LS_VERSION: installing into $LS_VENV (about 1 min, 1 GB)"
    [ -x "$LS_VENV/bin/python" ] || "$PYTHON" -m venv "$LS_VENV"
    # pip's chatter goes to a log, shown only when the install fails.
    log="$LS_VENV/pip-install.log"
    "$LS_VENV/bin/python" -m pip install --disable-pip-version-check -c "$LS_CONSTRAINTS" "label-studio==$LS_VERSION" >"$log" 2>&1 ||
        { tail -n 30 "$log" >&2; echo "pip install label-studio==$LS_VERSION failed (full log: $log)" >&2; exit 1; }
    # Check by import, not with 'label-studio --version': that creates a database in
    # ~/.local/share/label-studio, asks pypi.org for the latest version and does not exit.
    have=$("$LS_VENV/bin/python" -c 'import label_studio; print(label_studio.__version__)') ||
        { echo "label-studio installed but does not import in $LS_VENV" >&2; exit 1; }
    [ "$have" = "$LS_VERSION" ] ||
        { echo "expected label-studio $LS_VERSION in $LS_VENV, found $have" >&2; exit 1; }
    echo "$want" >"$stamp"
fi

# Chromium and chromedriver from Debian: the driver always matches the browser version.
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "chromium: already installed ($(/usr/bin/chromium --version 2>/dev/null || echo 'version unknown'))"
else
    if [ "$(id -u)" -ne 0 ]; then
        echo "chromium: /usr/bin/chromium or /usr/bin/chromedriver is missing and this is not root;" \
            "run as root or: sudo apt-get install --no-install-recommends chromium chromium-driver" >&2
        exit 1
    fi
    echo "chromium: installing chromium and chromium-driver with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    install() { apt-get install -y -q --no-install-recommends chromium chromium-driver >>"$log" 2>&1; }
    # Refresh the package lists only when needed: apt does not know the package (a fresh image
    # has no lists) or the install fails (stale lists name files the mirror no longer has).
    if ! apt-cache show chromium-driver >/dev/null 2>&1 || ! install; then
        echo "chromium: apt-get update"
        apt-get update -q >>"$log" 2>&1 && install ||
            { tail -n 30 "$log" >&2; echo "apt-get could not install chromium chromium-driver" >&2; exit 1; }
    fi
    [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] ||
        { echo "apt-get finished but /usr/bin/chromium or /usr/bin/chromedriver is still missing" >&2; exit 1; }
    echo "chromium: installed ($(/usr/bin/chromium --version 2>/dev/null))"
fi
