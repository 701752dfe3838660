#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (Debian packages for
# the oracles and services, ./.venv with seg-fast and its test extras), then runs it.
# Extra arguments go to pytest (e.g. scripts/test.sh -k wbxml).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use as independent oracles and real services.
# slapd, ldap-utils: a real OpenLDAP for the S/MIME lookup tests (tests/slapd_server.py).
# krb5-*: a real MIT KDC (its LDAP database module, in a slapd of its own) for the KCD tests
# (tests/kdc_server.py); libkrb5-dev: headers python-gssapi builds against (venv.sh, after this).
debs=(libwbxml2-utils libwbxml2-1 redis-server nginx-light openssl chromium chromium-driver slapd ldap-utils
      krb5-kdc krb5-admin-server krb5-kdc-ldap libkrb5-dev)
# SOGo 5.8's ActiveSync and what it runs on, started by tests/sogo_server.py in a temp dir
# (an independently written ActiveSync server behind the gateway, tests/test_sogo_*.py).
debs+=(sogo sogo-activesync postgresql dovecot-imapd memcached)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # The tests start their own servers on loopback; apt must not start system-wide ones
    # (postgresql, dovecot, memcached, sogo) while installing them.
    own_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        own_policy=1
        trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT     # also when the install fails
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ -z "$own_policy" ] || { $SUDO rm -f /usr/sbin/policy-rc.d; trap - EXIT; }
fi

source scripts/venv.sh test,bench,fuzz
# Two test processes (pytest-xdist; tests/conftest.py keeps the whole-pipeline runs on one of
# them) where there are two cores: about 40% less wall time than one. PYTEST_XDIST_AUTO_NUM_WORKERS
# chooses another number (1: the one-process order).
cores=$(nproc)
workers=${PYTEST_XDIST_AUTO_NUM_WORKERS:-$(( cores >= 2 ? 2 : 1 ))}
if [ "$workers" -gt 1 ]; then
    exec "$VPY" -m pytest -q -n "$workers" "$@"
fi
exec "$VPY" -m pytest -q "$@"
