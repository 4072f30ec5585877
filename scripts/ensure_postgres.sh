#!/usr/bin/env bash
# Start the local PostgreSQL cluster when it is installed but down (CI on a fresh machine).
# PostgreSQL tests skip with a reason when no server answers after this.
set -u
if command -v pg_isready >/dev/null 2>&1 && pg_isready -h 127.0.0.1 -p 5432 -q; then exit 0; fi
if [ -d /etc/postgresql ]; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start 2>/dev/null || true
  for _ in $(seq 1 20); do pg_isready -h 127.0.0.1 -p 5432 -q && exit 0; sleep 0.5; done
fi
echo "postgresql not available; postgres tests will skip" >&2
exit 1
