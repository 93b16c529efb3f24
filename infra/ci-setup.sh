#!/usr/bin/env bash
# Debian packages the e2e tests need (tests/e2e/test_postgres.py starts a throw-away PostgreSQL).
# Idempotent: does nothing when initdb is already installed. Needs root (or passwordless sudo).
#   infra/ci-setup.sh          # from the repository root, before `pytest -m e2e tests/e2e`
set -euo pipefail

if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "ci-setup: PostgreSQL already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "ci-setup: need root or sudo to apt-get install postgresql" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# postgresql-common's postinst creates the `postgres` system user the test runs the server as (root
# cannot run postgres); no cluster is started: the test runs initdb/pg_ctl in a temporary folder.
$SUDO apt-get install -y -q --no-install-recommends postgresql
echo "ci-setup: installed $(ls -d /usr/lib/postgresql/*/bin | tail -1)"
