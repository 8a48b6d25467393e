#!/usr/bin/env bash
# Start a two-node SLURM cluster (nodes n1, n2; cluster name scaleyard2) on this one host, as root,
# BESIDE the single-node cluster of start.sh: its own controller port, state folder and slurm.conf,
# sharing munged and the accounting daemons (MariaDB + slurmdbd) with it. Two slurmd daemons run
# as two nodes (Debian's build has MULTIPLE_SLURMD); each is started with `-N NAME`, since a plain
# `slurmd` would pick the first node matching the host name. Pids are recorded under $STATE/pids
# so that stop-2node.sh stops exactly what this script started.
#
#   bash slurm/cluster/start-2node.sh
#   export SLURM_CONF=/var/lib/scaleyard-slurm-2node/slurm.conf   # clients (sbatch, squeue, sacct,
#   sinfo; submitit and scaleyard through them) now talk to the two-node cluster
#   bash slurm/cluster/stop-2node.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${SCALEYARD_SLURM2_STATE:-/var/lib/scaleyard-slurm-2node}
PIDS=$STATE/pids
CONF=$STATE/slurm.conf
CLUSTER=scaleyard2
CTLD_PORT=${SCALEYARD_SLURM2_PORT:-16817}  # the single-node cluster uses SLURM's default 6817
HOST=$(hostname -s)
export SLURM_CONF=$CONF

log() { echo "[slurm-2node] $*"; }
alive() { [ -f "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out waiting for $what"; return 1
}

if [ "$(id -u)" != 0 ]; then echo "start-2node.sh must run as root (it starts daemons)" >&2; exit 1; fi
mkdir -p "$PIDS" "$STATE/ctld" "$STATE/log"

# --- shared daemons: munged and slurmdbd come from the single-node cluster ----------------------
# When they do not answer, start.sh brings them up (with its own cluster); stop-2node.sh then
# stops that cluster again, and only then.
if ! command -v slurmctld >/dev/null || ! SLURM_CONF=/etc/slurm/slurm.conf sacctmgr -n list cluster >/dev/null 2>&1
then
  log "munge/slurmdbd not running: starting the single-node cluster's daemons (start.sh)"
  env -u SLURM_CONF bash "$HERE/start.sh"  # the single-node cluster reads /etc/slurm
  touch "$STATE/started-single-node"
fi

# --- configuration -----------------------------------------------------------------------------
node_line=$(slurmd -C | head -1)
memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
# Both nodes advertise the host's CPUs: the host is oversubscribed (keep jobs small).
hardware=$(sed "s/^NodeName=[^ ]* //; s/RealMemory=[0-9]*/RealMemory=$((memory * 4 / 10))/" <<<"$node_line")
cat > "$CONF.tmp" <<CONF
# written by scaleyard slurm/cluster/start-2node.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
# A node that stops answering is declared DOWN (and its jobs requeued) after 20 s, not 300 s.
SlurmdTimeout=20
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
# n1/n2 do not resolve: NodeAddr is how SLURM (and the rendezvous fallback) reaches them.
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001 $hardware State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17002 $hardware State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
mv "$CONF.tmp" "$CONF"
mkdir -p "$STATE/slurmd-n1" "$STATE/slurmd-n2"

# --- daemons -------------------------------------------------------------------------------------
sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
if ! alive slurmctld; then
  slurmctld -f "$CONF"
fi
wait_for 30 slurmctld scontrol ping
for node in n1 n2; do
  if ! alive "slurmd-$node"; then
    slurmd -f "$CONF" -N "$node"
  fi
done
nodes_idle() { [ "$(sinfo -h -N -o %T | grep -Ec '^(idle|mixed|allocated)')" = 2 ]; }
if ! wait_for 30 "nodes n1,n2 idle" nodes_idle; then
  scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
  wait_for 15 "nodes n1,n2 idle" nodes_idle
fi
log "cluster $CLUSTER up (SLURM_CONF=$CONF): $(sinfo -h -o '%P %D nodes %T %N' | head -1)"
