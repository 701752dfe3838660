#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (Debian packages for
# the oracles and services, ./.venv with seg-fast and its test extras), then runs it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k wbxml).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use as independent oracles and real services.
# slapd, ldap-utils: a real OpenLDAP for the S/MIME lookup tests (tests/slapd_server.py).
debs=(libwbxml2-utils libwbxml2-1 redis-server nginx-light openssl chromium chromium-driver slapd ldap-utils)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

source scripts/venv.sh test,bench,fuzz
exec "$VPY" -m pytest -q "$@"
