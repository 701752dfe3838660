#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: makes ./.venv with the machine's python3 and installs
# seg-fast into it. Debian's python3 is "externally managed" (PEP 668), so nothing is
# ever pip-installed into it; on a fresh Debian the build needs come from apt.
# Usage: source scripts/venv.sh [extras]   (e.g. "test,bench"); sets $VPY.

PY=${PYTHON:-python3}
VENV=${SEG_FAST_VENV:-.venv}

_apt_install() {
    local SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "seg-fast: installing Debian packages: $*" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v "$PY" >/dev/null 2>&1; then
    _apt_install python3 python3-venv python3-dev gcc
fi

# Build needs: the venv module (python3-venv on Debian), headers (python3-dev) and a C compiler.
needs=()
"$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 || needs+=(python3-venv)
inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -f "$inc/Python.h" ] || needs+=(python3-dev)
command -v cc >/dev/null 2>&1 || needs+=(gcc libc6-dev)
if [ ${#needs[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || { echo "seg-fast: missing ${needs[*]} and no apt-get" >&2; exit 1; }
    _apt_install "${needs[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "seg-fast: creating $VENV with $("$PY" --version 2>&1)" >&2
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
spec="."
[ -n "${1:-}" ] && spec=".[$1]"
# Editable, so the compiled extensions are rebuilt in place when a .pyx changes.
"$VPY" -m pip install -q --disable-pip-version-check -e "$spec"
