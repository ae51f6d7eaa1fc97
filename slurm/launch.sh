#!/usr/bin/env bash
# Generic multi-node launcher: run once per node (srun --ntasks-per-node=1 slurm/launch.sh ...).
#
#   slurm/launch.sh --config CONFIG [--dry-run] [key=value ...]
#
# On every node it (1) runs the preflight planner for this job's real size and refuses
# to start when the config cannot fit (exit 1) or is invalid (exit 2), then (2) starts
#   torchrun --nnodes $SLURM_NNODES --nproc-per-node $GPUS_PER_NODE --rdzv-backend c10d
#            --rdzv-endpoint $MASTER:$RDZV_PORT --node-rank $SLURM_NODEID launch/train.py --config ... overrides
# with the first node of the allocation as rendezvous host. The overrides go to both the
# planner and the trainer, plus trainer.nnodes / trainer.n_gpus_per_node for this job.
#
# --dry-run (or DAPO_DRY_RUN=1) stops after the planner and prints the rendezvous
# settings and the torchrun command: CI uses it on a local Slurm cluster.
#
# Environment (all optional):
#   GPUS_PER_NODE   processes per node (default: SLURM_GPUS_ON_NODE, else 8)
#   GPU_MEMORY_GB   GiB per GPU for the planner (default: nvidia-smi's total of GPU 0)
#   MODEL_CONFIG    HF config.json for the planner (default: actor.model_path of the config)
#   PLAN_ARGS       extra planner flags, e.g. "--mfu 0.4 --gen-rounds 2"
#   RDZV_PORT       rendezvous port on the first node (default 20000 + job id % 20000)
#   LOG_DIR         per-node and per-rank logs (default: logs/slurm-$SLURM_JOB_ID)
#   PYTHON          interpreter (default: python)
#   TRAIN_SCRIPT    trainer entry (default: launch/train.py)
#
# Signals: SIGUSR1 (sent by the sbatch script before the time limit) is forwarded to the
# training processes (torchrun's children), never to torchrun, whose default action for
# USR1 would kill it without a checkpoint; torchrun and the log tee ignore USR1 because
# Slurm may signal every process of the step. The trainer checkpoints and exits 0.
# SIGTERM/SIGINT go to torchrun, which stops its workers.
set -euo pipefail
# shellcheck source=slurm/wait_child.sh
source "$(dirname "${BASH_SOURCE[0]}")/wait_child.sh"

die() {
	echo "launch.sh: $*" >&2
	exit 2
}

CONFIG=""
DRY_RUN="${DAPO_DRY_RUN:-0}"
OVERRIDES=()
while (($#)); do
	case "$1" in
	--config)
		[[ $# -ge 2 ]] || die "--config needs a path"
		CONFIG="$2"
		shift 2
		;;
	--config=*)
		CONFIG="${1#--config=}"
		shift
		;;
	--dry-run)
		DRY_RUN=1
		shift
		;;
	--*) die "unknown option $1 (overrides are key.sub=value)" ;;
	*)
		OVERRIDES+=("$1")
		shift
		;;
	esac
done
[[ -n "$CONFIG" ]] || die "usage: launch.sh --config CONFIG [--dry-run] [key=value ...]"
[[ -f "$CONFIG" ]] || die "config not found: $CONFIG (cwd $(pwd))"

for var in SLURM_JOB_ID SLURM_JOB_NODELIST SLURM_NNODES SLURM_NODEID SLURM_PROCID; do
	[[ -n "${!var:-}" ]] || die "$var is not set: run this script through srun inside an allocation"
done

PYTHON="${PYTHON:-python}"
TRAIN_SCRIPT="${TRAIN_SCRIPT:-launch/train.py}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
# Per-job port so that two jobs sharing a first node never collide.
RDZV_PORT="${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
LOG_DIR="${LOG_DIR:-logs/slurm-$SLURM_JOB_ID}"
if [[ -z "${GPU_MEMORY_GB:-}" ]]; then
	command -v nvidia-smi >/dev/null || die "GPU_MEMORY_GB is not set and nvidia-smi is not available"
	mib="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0)"
	GPU_MEMORY_GB="$(awk -v m="$mib" 'BEGIN { printf "%.2f", m / 1024 }')"
fi

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
[[ -n "$MASTER_ADDR" ]] || die "cannot resolve the first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
NODE_NAME="$(hostname -s)"

# Per-node log (everything this task prints), kept next to torchrun's per-rank logs.
mkdir -p "$LOG_DIR"
NODE_LOG="$LOG_DIR/node${SLURM_NODEID}-task${SLURM_PROCID}-${NODE_NAME}.log"
# tee ignores USR1/TERM: Slurm signals every process of the step, and a dead tee would
# kill this script with SIGPIPE on its next line of output.
exec > >(
	trap '' USR1 TERM INT
	exec tee -a "$NODE_LOG"
) 2>&1
# Until torchrun runs there is nobody to checkpoint: a USR1 now must not kill this script.
trap '' USR1

# ---- environment large jobs need (defaults only: anything already set wins) ----------
# Megatron's TP/SP overlap relies on kernels being issued in order on one hardware queue.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# A failed or timed-out collective aborts the process (torchrun then stops the job)
# instead of hanging 128 GPUs until the Slurm time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Frees collective buffers when the op finishes, not when the caching allocator notices.
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
# InfiniBand: longer timeout/retries survive transient congestion on big fabrics.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
# NVLink SHARP buffers cost GBs per GPU that the colocated vLLM engine needs.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Site-specific, set in the sbatch script if needed: NCCL_IB_HCA.
# Socket interface for gloo (CPU-side agreements and vLLM's gather group cross nodes) and
# NCCL's bootstrap: gloo binds the address its hostname resolves to, often 127.0.1.1 from
# /etc/hosts, which other nodes cannot reach. Multi-node jobs use the interface that routes
# to another node of the job (slurm/socket_ifname.sh) unless the variables are set.
if ((SLURM_NNODES > 1)) && [[ -z "${GLOO_SOCKET_IFNAME:-}" || -z "${NCCL_SOCKET_IFNAME:-}" ]]; then
	PEER="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | grep -vx -e "${SLURMD_NODENAME:-$NODE_NAME}" -e "$NODE_NAME" | head -n 1 || true)"
	[[ -n "$PEER" ]] || die "cannot tell another node of $SLURM_JOB_NODELIST from this one ($NODE_NAME)"
	IFNAME="$(bash "$(dirname "${BASH_SOURCE[0]}")/socket_ifname.sh" "$PEER")" ||
		die "no network interface reaches $PEER: set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (e.g. ib0, eth0)"
	export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$IFNAME}"
	export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$IFNAME}"
fi
# Not set on purpose: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True is incompatible
# with vLLM's sleep-mode memory pool.
CPUS="${SLURM_CPUS_ON_NODE:-$(nproc)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((CPUS / GPUS_PER_NODE > 0 ? CPUS / GPUS_PER_NODE : 1))}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
export PYTHONUNBUFFERED=1

echo "launch.sh: job $SLURM_JOB_ID node $SLURM_NODEID/$SLURM_NNODES ($NODE_NAME) task $SLURM_PROCID, $(date -u +%FT%TZ)"

# ---- 1. preflight planner: refuse before any model is loaded ------------------------
CLUSTER_OVERRIDES=("trainer.nnodes=$SLURM_NNODES" "trainer.n_gpus_per_node=$GPUS_PER_NODE")
plan_cmd=("$PYTHON" -m dapo_megatron.plan --config "$CONFIG" --nodes "$SLURM_NNODES"
	--gpus-per-node "$GPUS_PER_NODE" --gpu-memory-gb "$GPU_MEMORY_GB")
[[ -n "${MODEL_CONFIG:-}" ]] && plan_cmd+=(--model-config "$MODEL_CONFIG")
# shellcheck disable=SC2206  # PLAN_ARGS is a flag list by design
[[ -n "${PLAN_ARGS:-}" ]] && plan_cmd+=(${PLAN_ARGS})
plan_cmd+=("${OVERRIDES[@]}")
plan_rc=0
"${plan_cmd[@]}" || plan_rc=$?
if ((plan_rc != 0)); then
	echo "launch.sh: planner refused this job (exit $plan_rc): not starting torchrun" >&2
	exit "$plan_rc"
fi

# ---- 2. torchrun ----------------------------------------------------------------------
train_cmd=("$PYTHON" -m torch.distributed.run
	--nnodes "$SLURM_NNODES" --nproc-per-node "$GPUS_PER_NODE"
	--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$RDZV_PORT" --rdzv-id "$SLURM_JOB_ID"
	--node-rank "$SLURM_NODEID" --max-restarts 0
	--log-dir "$LOG_DIR/torchrun-node$SLURM_NODEID" --redirects 3 --tee 3
	"$TRAIN_SCRIPT" --config "$CONFIG" "${OVERRIDES[@]}" "${CLUSTER_OVERRIDES[@]}")

echo "launch.sh: rendezvous master=$MASTER_ADDR port=$RDZV_PORT nnodes=$SLURM_NNODES node_rank=$SLURM_NODEID" \
	"nproc_per_node=$GPUS_PER_NODE gloo_ifname=${GLOO_SOCKET_IFNAME:-default} nccl_ifname=${NCCL_SOCKET_IFNAME:-default}"
if [[ "$DRY_RUN" == 1 ]]; then
	echo "launch.sh: dry run, would run: ${train_cmd[*]}"
	exit 0
fi
[[ -f "$TRAIN_SCRIPT" ]] || die "trainer entry point not found: $TRAIN_SCRIPT"

# torchrun must survive USR1 (its default action is to die without a checkpoint), and Slurm
# signals every process of the step: start it with USR1 ignored. The workers inherit the
# ignore until the trainer installs its own USR1 handler (checkpoint, exit 0).
(
	trap '' USR1
	exec "${train_cmd[@]}"
) &
TORCHRUN_PID=$!

forward_usr1() {
	# The workers are torchrun's children; signal them by PID (never by name).
	local pids pid
	pids="$(ps -o pid= --ppid "$TORCHRUN_PID" | xargs || true)" # xargs: trim ps's padding
	echo "launch.sh: SIGUSR1 -> training processes $pids"
	for pid in $pids; do kill -USR1 "$pid" 2>/dev/null || true; done
}
trap forward_usr1 USR1
trap 'kill -TERM "$TORCHRUN_PID" 2>/dev/null || true' TERM INT

# A trapped USR1 interrupts `wait`: wait_child waits for torchrun's own exit status.
wait_child "$TORCHRUN_PID"
echo "launch.sh: torchrun exited with $WAIT_RC"
exit "$WAIT_RC"
