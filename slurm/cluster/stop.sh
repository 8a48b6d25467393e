#!/usr/bin/env bash
# Stop exactly the daemons slurm/cluster/start.sh started (by their recorded pids), newest first.
set -uo pipefail
STATE=${SCALEYARD_SLURM_STATE:-/var/lib/scaleyard-slurm}
PIDS=$STATE/pids
for daemon in slurmd slurmctld slurmdbd mariadb munged; do
  file=$PIDS/$daemon.pid
  [ -f "$file" ] || continue
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "[slurm-local] stopped $daemon ($pid)"
  fi
  rm -f "$file"
done
