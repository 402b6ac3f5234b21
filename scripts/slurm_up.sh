#!/usr/bin/env bash
# Start a one-node Slurm cluster on localhost (Debian's Slurm 22.05 + munge, no systemd), for the tests of
# slurm/*.sbatch. Idempotent: returns at once when the node is already up. Needs root (CI and dev boxes are).
#   bash scripts/slurm_up.sh          # install if needed, start, wait for the node to be idle
#   bash scripts/slurm_up.sh --down   # stop the daemons
set -euo pipefail
CPUS=${SLURM_TEST_CPUS:-8}   # declared CPUs (more than the machine has: config_overrides allows it)
CONF=/etc/slurm/slurm.conf
STATE=/var/spool/slurm

alive() {  # a pid that is running, not a zombie
  local pid; pid=$(pgrep -x "$1" | head -1) || return 1
  [ -n "$pid" ] && [ "$(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null)" != "Z" ]
}

if [ "${1:-}" = "--down" ]; then
  pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  echo "== slurm: installing Debian's slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

if alive slurmctld && alive slurmd && sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then
  echo "== slurm: already up"; exit 0
fi

HOST=$(hostname -s)
MEM_MB=$(awk '/MemTotal/ {print int($2/1024*0.8)}' /proc/meminfo)  # RealMemory must stay below MemTotal
mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d" /var/log/slurm /run/munge /var/lib/munge /etc/munge
cat > "$CONF" <<CONF
ClusterName=loopmoe-ci
SlurmctldHost=$HOST
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=4
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
JobRequeue=1
KillWait=10
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
alive munged || su -s /bin/sh munge -c "/usr/sbin/munged --force" || /usr/sbin/munged --force
alive slurmctld || slurmctld
sleep 1
alive slurmd || slurmd
for _ in $(seq 1 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE "^(idle|mixed|alloc)"; then
    echo "== slurm: node $HOST idle ($CPUS CPUs declared)"; exit 0
  fi
  scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
  sleep 1
done
echo "error: slurm node did not become idle; see /var/log/slurm/*.log" >&2
sinfo >&2 || true
tail -20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
