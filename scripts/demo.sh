#!/usr/bin/env bash
# Runs the demo (mailbox simulator + gateway with demo policies) on a fresh Debian machine:
# creates ./.venv if missing, installs seg-fast into it, runs `seg-fast demo`.
# Extra arguments go to `seg-fast demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh ""    # no extras (and not this script's arguments)
exec "$VENV/bin/seg-fast" demo "$@"
