#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for the tests marked `slurm`
# (tests/slurm/conftest.py starts it once per test session and stops it at the end).
#
#   bash tests/slurm/cluster.sh up DIR     install what is missing, write the config, start the daemons
#   bash tests/slurm/cluster.sh down DIR   cancel every job, stop every daemon started by `up` (by pid)
#
# Everything lives under DIR: slurm.conf, gres.conf, the munge key and socket, the controller's
# state, the nodes' spool directories, the daemons' logs and pid files. Clients find the cluster
# with SLURM_CONF=DIR/slurm.conf (written to DIR/env). Exit code 77 from `up`: this machine cannot
# run it (not root and the Debian packages slurmctld slurmd slurm-client munge are missing, or
# apt-get failed); the last line on stderr says what is missing.
#
# Works without systemd and without cgroups (containers, CI): proctrack/linuxproc and task/none;
# two `slurmd -N NAME` daemons on their own ports, both NodeAddr=127.0.0.1; the node names are
# loopback aliases added to /etc/hosts (not `localhost`, which slurmctld takes for one host and then
# refuses the second node: "Duplicated NodeHostName"). Each node has one stand-in GPU (File=/dev/null)
# so that `--gpus-per-node=1` gives SLURM_GPUS_ON_NODE=1 as on a GPU cluster, and 4 CPUs and 4000 MB
# of memory (two jobs fit side by side; a request above 4000 MB is refused like on a small partition).
# AuthInfo cred_expire=5: a requeued job is eligible again after about that many seconds (default 120).
set -euo pipefail

NODES=(shdnode1 shdnode2)
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "cluster.sh: $*" >&2; exit 1; }
cannot() { echo "cluster.sh: cannot start a test Slurm cluster: $*" >&2; exit 77; }

install_packages() {  # the Debian packages, when a daemon or client is missing
  local missing=()
  for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null || missing+=("$b"); done
  ((${#missing[@]} == 0)) && return 0
  ((EUID == 0)) || cannot "${missing[*]} not installed and not root (run: sudo apt-get install ${PACKAGES[*]})"
  command -v apt-get >/dev/null || cannot "${missing[*]} not installed and no apt-get (install ${PACKAGES[*]})"
  echo "cluster.sh: installing ${PACKAGES[*]} with apt-get" >&2
  if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
         || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
              --no-install-recommends "${PACKAGES[@]}"; }; } >"$dir/apt.log" 2>&1; then
    cannot "'apt-get install ${PACKAGES[*]}' failed (log: $dir/apt.log)"
  fi
}

add_host_aliases() {  # node names resolve to this machine
  local n
  for n in "${NODES[@]}"; do
    getent hosts "$n" >/dev/null && continue
    ((EUID == 0)) || cannot "node name $n does not resolve: add '127.0.0.1 ${NODES[*]}' to /etc/hosts"
    echo "127.0.0.1 $n" >>/etc/hosts
  done
}

free_ports() {  # $1 free TCP ports on loopback
  python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

write_config() {
  local ports ctld_port i
  read -ra ports <<<"$(free_ports 3)"
  ctld_port="${ports[0]}"
  mkdir -p "$dir/state" "$dir/munge" "$dir/log" "${NODES[@]/#/$dir/spool-}"
  cat >"$dir/slurm.conf" <<EOF
ClusterName=shdtest
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
DefMemPerCPU=500
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
EOF
  : >"$dir/gres.conf"
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[i]} NodeAddr=127.0.0.1 Port=${ports[i + 1]} CPUs=4 RealMemory=4000 Gres=gpu:1 State=UNKNOWN" \
      >>"$dir/slurm.conf"
    echo "NodeName=${NODES[i]} Name=gpu File=/dev/null" >>"$dir/gres.conf"
  done
  echo "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
  echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env"
}

wait_until() {  # wait_until SECONDS WHAT COMMAND...: poll COMMAND until it succeeds
  local t="$1" what="$2"
  shift 2
  for ((i = 0; i < t * 5; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what did not come up in ${t}s; logs in $dir/log/"
}

nodes_idle() { [[ "$(sinfo -h -N -o '%t' | sort -u)" == idle ]] && (($(sinfo -h -N -o '%N' | wc -l) == ${#NODES[@]})); }

up() {
  mkdir -p "$dir"
  install_packages
  add_host_aliases
  write_config
  export SLURM_CONF="$dir/slurm.conf"
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 711 "$dir/munge"   # munged: the socket's directory must be searchable by every client
  chmod 600 "$dir/munge/munge.key"
  trap down EXIT   # a failed start leaves nothing running
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed"
  slurmctld -i
  for n in "${NODES[@]}"; do slurmd -N "$n"; done
  wait_until 60 "the nodes (sinfo: $(sinfo -h -N -o '%N %t' 2>&1 | tr '\n' ' '))" nodes_idle
  trap - EXIT
  echo "cluster.sh: up: ${NODES[*]} idle; SLURM_CONF=$SLURM_CONF" >&2
}

down() {
  [[ -f "$dir/slurm.conf" ]] || return 0
  export SLURM_CONF="$dir/slurm.conf"
  # Jobs first (a test that failed may leave one running): their processes belong to the step
  # daemons (slurmstepd) that the slurmd daemons started, not to us.
  if scancel --full --quiet --signal=KILL --user="$(id -un)" 2>/dev/null; then
    for ((i = 0; i < 100; i++)); do
      [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
      sleep 0.2
    done
  fi
  local f p alive pids=()
  for f in "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    if [[ -f "$f" ]]; then pids+=("$(cat "$f")"); fi
  done
  for p in /proc/[0-9]*; do  # step daemons still there: this cluster's run in its log directory
    if [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd && "$(readlink "$p/cwd")" == "$dir"/* ]]; then
      pids+=("${p#/proc/}")
    fi
  done
  ((${#pids[@]})) || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do  # up to 10 s, then SIGKILL
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.2
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
}

(($# == 2)) || die "usage: bash tests/slurm/cluster.sh up|down DIR"
dir="$(mkdir -p "$2" && cd "$2" && pwd)"
case "$1" in
  up) up ;;
  down) down ;;
  *) die "unknown command '$1': give up or down" ;;
esac
