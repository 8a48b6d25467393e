#!/usr/bin/env bash
# Install (apt) and start a single-node SLURM with accounting on this machine, as root:
# munged, MariaDB, slurmdbd, slurmctld, slurmd. Idempotent: with everything installed and running
# it returns in about a second. Every daemon's pid is recorded under $STATE/pids so that
# stop.sh stops exactly these daemons and nothing else.
#
#   bash slurm/cluster/start.sh        # then: sinfo, sbatch, scaleyard submit ... --cluster slurm
#   bash slurm/cluster/stop.sh
set -euo pipefail

STATE=${SCALEYARD_SLURM_STATE:-/var/lib/scaleyard-slurm}
PIDS=$STATE/pids
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARKER="# written by scaleyard slurm/cluster/start.sh"
SOCK=/run/mysqld/mysqld.sock  # mariadbd runs as mysql: its socket and pid live in its own folder
HOST=$(hostname -s)

log() { echo "[slurm-local] $*"; }
alive() { [ -f "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out waiting for $what"; return 1
}

if [ "$(id -u)" != 0 ]; then echo "start.sh must run as root (it installs packages and starts daemons)" >&2; exit 1; fi

if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null \
   || ! command -v munged >/dev/null; then
  log "installing slurm-wlm, slurmdbd, munge, mariadb-server (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurm-wlm slurmdbd munge mariadb-server >/dev/null
fi

mkdir -p "$PIDS" "$STATE/ctld" "$STATE/slurmd" "$STATE/log" /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge

# --- munge -----------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
if ! alive munged; then
  runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
  wait_for 10 munged test -s /run/munge/munged.pid
  cp /run/munge/munged.pid "$PIDS/munged.pid"
fi

# --- MariaDB (accounting storage) -------------------------------------------------------------
if [ ! -d "$STATE/mysql/mysql" ]; then
  mkdir -p "$STATE/mysql" && chown mysql:mysql "$STATE/mysql"
  mariadb-install-db --user=mysql --datadir="$STATE/mysql" --skip-test-db >/dev/null
fi
if ! alive mariadb; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  mariadbd --user=mysql --datadir="$STATE/mysql" --socket="$SOCK" --pid-file=/run/mysqld/mysqld.pid \
    --bind-address=127.0.0.1 --port=3306 --log-error="$STATE/mysql/error.log" --skip-name-resolve &
  wait_for 30 MariaDB mariadb --socket="$SOCK" -e "SELECT 1"
  cp /run/mysqld/mysqld.pid "$PIDS/mariadb.pid"
fi
mariadb --socket="$SOCK" -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
  FLUSH PRIVILEGES;"

# --- configuration (only files this script wrote are ever rewritten) --------------------------
write_conf() {  # write_conf PATH < content
  if [ -f "$1" ] && ! grep -q "$MARKER" "$1"; then
    echo "$1 exists and was not written by scaleyard; move it away to use the local cluster" >&2; exit 1
  fi
  { echo "$MARKER"; cat; } > "$1.tmp" && mv "$1.tmp" "$1"
}
node_line=$(slurmd -C | head -1)
memory=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
node_line=$(sed "s/RealMemory=[0-9]*/RealMemory=$((memory * 9 / 10))/; s/NodeName=[^ ]*/NodeName=$HOST/" <<<"$node_line")
write_conf "$CONF" <<CONF
ClusterName=scaleyard
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# Requeued jobs restart in ~10 s instead of waiting out the default 120 s credential expiry.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
$node_line State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
write_conf "$DBD_CONF" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$PIDS/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
CONF
chmod 600 "$DBD_CONF"

# --- SLURM daemons ------------------------------------------------------------------------------
if ! alive slurmdbd; then
  slurmdbd
fi
wait_for 60 slurmdbd sacctmgr -n list cluster  # slurmctld dies at start if slurmdbd is not serving yet
sacctmgr -i -Q add cluster scaleyard >/dev/null 2>&1 || true
if ! alive slurmctld; then
  slurmctld
fi
wait_for 30 slurmctld scontrol ping
if ! alive slurmd; then
  slurmd
fi
node_idle() { sinfo -h -n "$HOST" -o %T | grep -Eq '^(idle|mixed|allocated)'; }
if ! wait_for 30 "node $HOST idle" node_idle; then
  scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  wait_for 15 "node $HOST idle" node_idle
fi
log "cluster up: $(sinfo -h -o '%P %D %T %c CPUs %m MB' | head -1)"
