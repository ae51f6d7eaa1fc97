#!/usr/bin/env bash
# A real one-node Slurm cluster for tests and CI (Debian 12: Slurm 22.05).
#
#   scripts/slurm_local.sh start [DIR]   # prints DIR; then: export SLURM_CONF=DIR/etc/slurm.conf
#   scripts/slurm_local.sh stop DIR      # cancels jobs, stops the daemons by PID, removes nothing else
#   scripts/slurm_local.sh status DIR
#
# Everything lives under DIR (default: a new temp dir): config, state, spool, logs, PID
# files and eight fake GPU character devices (gres needs device files; count-only gres
# leaves the node INVAL), so `--gpus-per-node=8` directives can be tested on a CPU box.
# Auth is auth/none (no munge daemon). The daemons are tracked by PID and stopped by
# PID only: other Slurm daemons on the machine are never touched.
#
# Exit codes: 0 ok; 1 failure (the daemon logs are printed); 3 Slurm cannot run here:
# not root, or not installed and apt-get is missing or fails. Callers may skip on 3 only.
set -euo pipefail

PKGS=(slurmctld slurmd slurm-client)

usage() {
	echo "usage: $0 start [DIR] | stop DIR | status DIR" >&2
	exit 2
}

ensure_installed() {
	if [[ $(id -u) -ne 0 ]]; then
		# SlurmUser=root and mknod of the fake GPU devices both need root.
		echo "slurm_local.sh: needs root (SlurmUser=root, mknod for fake GPUs); running as $(id -un)" >&2
		exit 3
	fi
	command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return 0
	if ! command -v apt-get >/dev/null; then
		echo "slurm_local.sh: slurmctld/slurmd/sbatch are not installed and there is no apt-get to install them" >&2
		exit 3
	fi
	echo "slurm_local.sh: installing ${PKGS[*]} with apt-get" >&2
	export DEBIAN_FRONTEND=noninteractive
	if ! { apt-get update -q && apt-get install -y -q --no-install-recommends "${PKGS[@]}"; } >&2; then
		echo "slurm_local.sh: apt-get could not install ${PKGS[*]} (see above)" >&2
		exit 3
	fi
}

free_port() {
	"${PYTHON:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

dump_logs() {
	local dir="$1"
	for f in "$dir"/log/*.log; do
		[[ -f "$f" ]] && {
			echo "--- $f" >&2
			tail -n 30 "$f" >&2
		}
	done
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
	local deadline=$((SECONDS + $1)) what="$2"
	shift 2
	until "$@" >/dev/null 2>&1; do
		if ((SECONDS >= deadline)); then
			echo "slurm_local.sh: timed out waiting for $what" >&2
			return 1
		fi
		sleep 0.2
	done
}

node_idle() {
	[[ "$(sinfo -h -N -n localhost -o %t 2>/dev/null)" == idle ]]
}

start() {
	ensure_installed
	local dir="${1:-}"
	[[ -n "$dir" ]] || dir="$(mktemp -d /tmp/slurm-local.XXXXXX)"
	mkdir -p "$dir"/{etc,state,spool/localhost,log,run,fakegpu}
	dir="$(cd "$dir" && pwd)"
	local cpus ctld_port slurmd_port
	cpus="$(nproc --all)"  # plain nproc obeys OMP_NUM_THREADS: a 1-CPU node refuses 2-task jobs
	ctld_port="$(free_port)"
	slurmd_port="$(free_port)"
	while [[ "$slurmd_port" == "$ctld_port" ]]; do slurmd_port="$(free_port)"; done

	for i in 0 1 2 3 4 5 6 7; do
		[[ -c "$dir/fakegpu/nvidia$i" ]] || mknod -m 666 "$dir/fakegpu/nvidia$i" c 195 "$i"
	done
	cat >"$dir/etc/gres.conf" <<EOF
AutoDetect=off
NodeName=localhost Name=gpu File=$dir/fakegpu/nvidia[0-7]
EOF
	cat >"$dir/etc/slurm.conf" <<EOF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
GresTypes=gpu
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=4000 Gres=gpu:8 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
	export SLURM_CONF="$dir/etc/slurm.conf"

	# -D: foreground (so $! is the daemon); stdio detached so callers capturing our output return.
	slurmctld -D -c -i -f "$SLURM_CONF" </dev/null >"$dir/log/slurmctld.stdout" 2>&1 &
	echo $! >"$dir/slurmctld.pid"
	if ! wait_for 30 "slurmctld (scontrol ping)" bash -c 'scontrol ping | grep -q UP'; then
		dump_logs "$dir"
		stop "$dir"
		exit 1
	fi
	slurmd -D -N localhost -f "$SLURM_CONF" </dev/null >"$dir/log/slurmd.stdout" 2>&1 &
	echo $! >"$dir/slurmd.pid"
	if ! wait_for 30 "node localhost idle (sinfo)" node_idle; then
		sinfo -N -l >&2 || true
		dump_logs "$dir"
		stop "$dir"
		exit 1
	fi
	echo "SLURM_CONF=$SLURM_CONF" >"$dir/env"
	echo "$dir"
}

stop() {
	local dir="${1:-}"
	[[ -n "$dir" && -d "$dir" ]] || usage
	export SLURM_CONF="$dir/etc/slurm.conf"
	if [[ -f "$dir/slurmctld.pid" ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
		scancel --quiet --user="$(id -un)" 2>/dev/null || true
	fi
	local pidfile pid
	for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
		[[ -f "$pidfile" ]] || continue
		pid="$(cat "$pidfile")"
		if kill -0 "$pid" 2>/dev/null; then
			kill -TERM "$pid" 2>/dev/null || true
			for _ in $(seq 50); do
				kill -0 "$pid" 2>/dev/null || break
				sleep 0.1
			done
			kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
		fi
		rm -f "$pidfile"
	done
}

status() {
	local dir="${1:-}"
	[[ -n "$dir" && -d "$dir" ]] || usage
	export SLURM_CONF="$dir/etc/slurm.conf"
	for name in slurmctld slurmd; do
		if [[ -f "$dir/$name.pid" ]] && kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
			echo "$name: running (pid $(cat "$dir/$name.pid"))"
		else
			echo "$name: stopped"
		fi
	done
	sinfo -N 2>/dev/null || true
}

case "${1:-}" in
start) start "${2:-}" ;;
stop) stop "${2:-}" ;;
status) status "${2:-}" ;;
*) usage ;;
esac
