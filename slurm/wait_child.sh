# shellcheck shell=bash
# Sourced by dapo_32b_h800.sbatch and launch.sh, which both trap SIGUSR1 while a child runs.
#
# wait_child PID   sets WAIT_RC to the child's own exit status.
#
# `wait` returns 128+N as soon as a trapped signal N arrives, so it is repeated while the
# child lives. When the child exits while the trap handler runs (the workers got the signal
# straight from slurmstepd and torchrun followed them), bash reaps it inside the handler and
# `kill -0` already fails: the last interrupted `wait` said 138, not the child's status.
# Bash keeps the status of a reaped background child, so one more `wait` returns it.
#
# Bash scopes variables dynamically: a trap handler that runs inside this function sees and
# may assign its locals, hence the name no handler would pick.
wait_child() {
	local _wait_child_pid=$1
	while kill -0 "$_wait_child_pid" 2>/dev/null; do
		wait "$_wait_child_pid" || true
	done
	WAIT_RC=0
	wait "$_wait_child_pid" || WAIT_RC=$?
}
