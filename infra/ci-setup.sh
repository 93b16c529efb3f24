#!/usr/bin/env bash
# Debian packages the e2e tests need: PostgreSQL (tests/e2e/test_postgres.py and test_celery.py start a
# throw-away cluster) and Redis (tests/e2e/test_celery.py: the Celery broker). Neither is started here: the
# tests start their own servers on loopback in temporary folders.
# Idempotent: installs only what is missing. Needs root (or passwordless sudo).
#   infra/ci-setup.sh          # from the repository root, before `pytest -m e2e tests/e2e`
set -euo pipefail

missing=()
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    # postgresql-common's postinst creates the `postgres` system user the tests run the server as (root
    # cannot run postgres)
    missing+=(postgresql)
fi
if ! command -v redis-server >/dev/null 2>&1; then
    missing+=(redis-server)
fi
if [ ${#missing[@]} -eq 0 ]; then
    echo "ci-setup: PostgreSQL and Redis already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "ci-setup: need root or sudo to apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "ci-setup: installed ${missing[*]}"
