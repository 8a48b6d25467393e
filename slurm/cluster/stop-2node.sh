#!/usr/bin/env bash
# Stop exactly the daemons slurm/cluster/start-2node.sh started (by their recorded pids), and the
# single-node cluster's daemons only when start-2node.sh had to start them.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${SCALEYARD_SLURM2_STATE:-/var/lib/scaleyard-slurm-2node}
PIDS=$STATE/pids
for daemon in slurmd-n2 slurmd-n1 slurmctld; do
  file=$PIDS/$daemon.pid
  [ -f "$file" ] || continue
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "[slurm-2node] stopped $daemon ($pid)"
  fi
  rm -f "$file"
done
if [ -f "$STATE/started-single-node" ]; then
  rm -f "$STATE/started-single-node"
  env -u SLURM_CONF bash "$HERE/stop.sh"
fi
