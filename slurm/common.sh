# Shared logic of slurm/loopmoe_*.sbatch: sourced, never run. See docs/slurm.md.
#
# One task per GPU through srun; every task runs pretrain_loopmoe.py, which takes its rank from SLURM_PROCID.
# The batch shell traps USR1 (sent ahead of the time limit by `#SBATCH --signal=B:USR1@300`, or by hand with
# `scancel --signal=USR1 --batch JOB`), forwards it to the srun step, waits for the step to checkpoint and
# exit, then requeues the job unless the run is finished; the next run resumes from <ckpt dir>/latest.
#
# Inputs (environment; the templates set MODEL and the defaults of GLOBAL_BATCH):
#   MODEL CONFIG                preset name / file (CONFIG default: configs/$MODEL.yaml)
#   DATA_PREFIX DATA_WEIGHTS TOKENIZER RUN_DIR CKPT_DIR   data, tokenizer, run and checkpoint paths
#   TP PP EP                    parallel layout (empty: the preset's); DP = world / (TP x PP)
#   GLOBAL_BATCH                samples per step; grad_accum = GLOBAL_BATCH / (micro_batch x DP) (empty: preset's)
#   NODES NTASKS_PER_NODE GPUS_PER_NODE   default from the allocation (outside a job: 1, 8, 8)
#   EXTRA_ARGS                  more section.key=value overrides, space separated
#   PYTHON                      interpreter (default: $VIRTUAL_ENV, then <repo>/.venv, then python3)
#   DRY_RUN=1                   print layout + srun command (NODES may be a list: NODES=1,4,16) and exit
#   SRUN_ARGS                   extra srun options (e.g. "--label"; they come after the site's binding options)
# Site settings (network interfaces and HCAs, CPU binding, allocator): slurm/site.sh, the one file to edit.

lm_log() { printf '%s [loopmoe-slurm] %s\n' "$(date +%H:%M:%S)" "$*"; }
lm_die() { printf 'error: %s\n' "$*" >&2; exit "${2:-1}"; }

# Export $1=$2 unless $2 is empty or $1 is already set (the submitting shell wins over slurm/site.sh).
lm_export_default() {
  [ -n "$2" ] && [ -z "${!1:-}" ] && export "$1=$2"
  return 0
}

# The site block's settings as the environment of the tasks (see slurm/site.sh).
lm_site_env() {
  lm_export_default NCCL_SOCKET_IFNAME "${SITE_SOCKET_IFNAME:-}"
  # gloo takes one interface name: NCCL's list / prefix / ^exclusion syntax is not for it. The first item, when
  # it names an interface of this (the first) node; else gloo picks (the host name's address).
  local first=${SITE_SOCKET_IFNAME%%,*}; first=${first#=}
  if [ -n "$first" ] && [ -e "/sys/class/net/$first" ]; then lm_export_default GLOO_SOCKET_IFNAME "$first"; fi
  lm_export_default NCCL_IB_HCA "${SITE_IB_HCA:-}"
  lm_export_default NCCL_IB_GID_INDEX "${SITE_IB_GID_INDEX:-}"
  lm_export_default NCCL_IB_TIMEOUT "${SITE_IB_TIMEOUT:-}"
  lm_export_default NCCL_IB_RETRY_CNT "${SITE_IB_RETRY_CNT:-}"
  lm_export_default NCCL_DEBUG "${SITE_NCCL_DEBUG:-}"
  if [ -z "${PYTORCH_CUDA_ALLOC_CONF:-}${PYTORCH_ALLOC_CONF:-}" ]; then
    lm_export_default PYTORCH_CUDA_ALLOC_CONF "${SITE_CUDA_ALLOC_CONF:-}"
  fi
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a failed rank aborts, no hang
}

# One line: what the job's network, binding and allocator settings are ("-" = not set: the library picks).
lm_site_summary() {
  local v out="site:"
  for v in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_GID_INDEX NCCL_IB_TIMEOUT NCCL_IB_RETRY_CNT \
           NCCL_DEBUG PYTORCH_CUDA_ALLOC_CONF PYTORCH_ALLOC_CONF; do
    [ -n "${!v:-}" ] && out+=" $v=${!v}"
  done
  echo "$out cpu-bind=${SITE_CPU_BIND:-(Slurm default)} distribution=${SITE_DISTRIBUTION:-(Slurm default)}" \
       "(unset NCCL/gloo variables: the library picks; edit slurm/site.sh)"
}

# The rendezvous port: from the job id and restart count (two jobs sharing a node, or a requeued run whose
# old port is still in TIME_WAIT, do not collide), BELOW the kernel's ephemeral range, from which every
# outgoing connection (NCCL's and gloo's sockets, any other job's) takes its local port: a port there can be
# in use when rank 0 binds it. The range is read on this node (the batch shell runs on the first node, where
# rank 0 listens): [10000, start of the range), normally 10000-32767; above the range if it starts too low.
# $1: the range as "low high" (default: this node's /proc/sys/net/ipv4/ip_local_port_range).
lm_master_port() {
  local lo=32768 hi=60999 range=${1:-} base span
  [ -n "$range" ] || range=$(cat /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null)
  read -r lo hi <<< "$range"
  [[ $lo =~ ^[0-9]+$ && $hi =~ ^[0-9]+$ ]] || { lo=32768; hi=60999; }
  base=10000 span=$((lo - 10000))
  if [ "$span" -lt 1000 ]; then base=$((hi + 1)) span=$((65536 - hi - 1)); fi
  if [ "$span" -lt 1000 ]; then base=10000 span=22768; fi  # no room outside the range: the usual one
  echo $((base + (${SLURM_JOB_ID:-0} + 997 * ${SLURM_RESTART_COUNT:-0}) % span))
}

# The step of the checkpoint <dir>/latest names (0 when there is none).
lm_latest_step() {
  local f="$1/latest" tag
  [ -f "$f" ] || { echo 0; return; }
  tag=$(<"$f"); tag=${tag##*_}
  [[ $tag =~ ^[0-9]+$ ]] && echo $((10#$tag)) || echo 0
}

# Resolve the config with the overrides and check the layout for a world of $1 nodes x $2 tasks. Prints shell
# assignments (L_*) to eval; on a layout that does not divide, prints why to stderr and returns 3.
lm_layout() {
  "$PYTHON" - "$ROOT" "$CONFIG" "$1" "$2" "${GLOBAL_BATCH:-}" "${OVERRIDES[@]}" <<'PY'
import shlex, sys
root, config, nodes, tpn, gb, *ovr = sys.argv[1:]
sys.path.insert(0, root)
from loopmoe.config import ConfigError, load_config
try:
    cfg = load_config(config, ovr)
except ConfigError as e:
    sys.exit(f"error: config: {e}")
p, m, t = cfg.parallel, cfg.model, cfg.train
nodes, tpn = int(nodes), int(tpn)
world, mp = nodes * tpn, p.tp * p.pp
where = f"{nodes} node(s) x {tpn} tasks = world {world}"
err = []
try:  # the rules training applies at start-up (loopmoe/parallel/layout.py), when that module is there
    from loopmoe.parallel.layout import LayoutError, validate_layout
except ImportError:
    validate_layout = None
if validate_layout is not None:
    try:
        validate_layout(cfg, world)
    except LayoutError as e:
        err.append(str(e))
else:  # the essential rules
    if world % mp:
        err.append(f"world size {world} is not divisible by TP x PP = {p.tp} x {p.pp} = {mp}")
    elif (world // mp) % p.ep:
        err.append(f"EP={p.ep} does not divide the data-parallel size DP={world // mp}: expert-parallel groups are "
                   "made of data-parallel ranks")
    if m.ffn == "moe" and m.n_experts % p.ep:
        err.append(f"model.n_experts={m.n_experts} is not divisible by EP={p.ep}")
    if m.n_kv_heads % p.tp:
        err.append(f"model.n_kv_heads={m.n_kv_heads} (n_heads={m.n_heads}) is not divisible by TP={p.tp}")
dp = max(world // mp, 1)
if gb and not err:
    gb = int(gb)
    per = t.micro_batch * dp
    if gb % per:
        err.append(f"GLOBAL_BATCH={gb} is not a multiple of micro_batch x DP = {t.micro_batch} x {dp} = {per}; "
                   f"use a multiple of {per} or GLOBAL_BATCH= (empty) to keep the preset's grad_accum")
    accum = gb // per
else:
    accum = t.grad_accum
    gb = t.micro_batch * accum * dp
if err:
    sys.exit("error: refusing the layout for " + where + ":\n  - " + "\n  - ".join(err))
warn = []
if p.tp > tpn:
    warn.append(f"TP={p.tp} spans nodes ({tpn} tasks per node): tensor parallelism over the network is slow")
ckpt = cfg.checkpoint.dir or f"{cfg.logging.run_dir.rstrip('/')}/checkpoints"
out = dict(L_WORLD=world, L_TP=p.tp, L_PP=p.pp, L_EP=p.ep, L_DP=dp, L_MICRO=t.micro_batch, L_ACCUM=accum,
           L_GB=gb, L_TOKENS=gb * cfg.data.seq_len, L_STEPS=t.steps, L_RUN_DIR=cfg.logging.run_dir, L_CKPT_DIR=ckpt,
           L_EXPERTS=m.n_experts if m.ffn == "moe" else 0, L_EXIT_INTERVAL=t.exit_interval, L_WARN="; ".join(warn))
print("\n".join(f"{k}={shlex.quote(str(v))}" for k, v in out.items()))
PY
}

# Defaults and the override list (OVERRIDES) from the environment.
lm_setup() {
  ROOT=${ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
  [ -f "$ROOT/pretrain_loopmoe.py" ] || lm_die "$ROOT is not the repository root (no pretrain_loopmoe.py): submit from the repository root or set LOOPMOE_ROOT"
  cd "$ROOT" || exit 1
  # shellcheck source=site.sh
  source "$ROOT/slurm/site.sh" || lm_die "$ROOT/slurm/site.sh not found (the site block: network, binding, allocator)"
  if [ -z "${PYTHON:-}" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then PYTHON=$VIRTUAL_ENV/bin/python
    elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python
    else PYTHON=python3; fi
  fi
  CONFIG=${CONFIG:-configs/${MODEL:?MODEL is not set}.yaml}
  [ -f "$CONFIG" ] || lm_die "config $CONFIG not found (MODEL=${MODEL:-} CONFIG=${CONFIG}); presets are in configs/"
  local name; name=$(basename "$CONFIG" .yaml)
  DATA_PREFIX=${DATA_PREFIX:-data/tokens/train_text_document}
  TOKENIZER=${TOKENIZER:-data/tokenizer/spm.model}
  RUN_DIR=${RUN_DIR:-runs/$name}
  OVERRIDES=("logging.run_dir=$RUN_DIR" "data.prefixes=$DATA_PREFIX" "data.tokenizer_model=$TOKENIZER")
  [ -n "${DATA_WEIGHTS:-}" ] && OVERRIDES+=("data.weights=$DATA_WEIGHTS")
  [ -n "${CKPT_DIR:-}" ] && OVERRIDES+=("checkpoint.dir=$CKPT_DIR")
  local extra=(); read -r -a extra <<< "${EXTRA_ARGS:-}"
  OVERRIDES+=("${extra[@]}")
  [ -n "${TP:-}" ] && OVERRIDES+=("parallel.tp=$TP")
  [ -n "${PP:-}" ] && OVERRIDES+=("parallel.pp=$PP")
  [ -n "${EP:-}" ] && OVERRIDES+=("parallel.ep=$EP")
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
    NTASKS_PER_NODE=${NTASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}
    local g=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${g##*:}}  # "h100:8" -> 8
  else
    NODES=${NODES:-1}; NTASKS_PER_NODE=${NTASKS_PER_NODE:-8}; GPUS_PER_NODE=${GPUS_PER_NODE:-8}
  fi
  NTASKS_PER_NODE=${NTASKS_PER_NODE%%(*}  # "8(x2)" -> 8
}

# The srun command line for $1 nodes (array SRUN_CMD), with the layout's grad_accum.
lm_srun_cmd() {
  SRUN_CMD=(srun --nodes="$1" --ntasks-per-node="$NTASKS_PER_NODE" --ntasks="$L_WORLD" --kill-on-bad-exit=1
            --chdir="$ROOT")
  # srun no longer inherits --cpus-per-task from the job (Slurm 22.05+): pass it, the binding needs it.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then SRUN_CMD+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
  if [ -n "${SITE_CPU_BIND:-}" ]; then SRUN_CMD+=(--cpu-bind="$SITE_CPU_BIND"); fi
  if [ -n "${SITE_DISTRIBUTION:-}" ]; then SRUN_CMD+=(--distribution="$SITE_DISTRIBUTION"); fi
  local sargs=(); read -r -a sargs <<< "${SRUN_ARGS:-}"
  SRUN_CMD+=("${sargs[@]}" "$PYTHON" -u pretrain_loopmoe.py --config "$CONFIG" "${OVERRIDES[@]}")
  if [ -n "${GLOBAL_BATCH:-}" ]; then SRUN_CMD+=("train.grad_accum=$L_ACCUM"); fi
}

lm_describe() {  # $1 nodes
  local gpus="$GPUS_PER_NODE GPUs/node, NCCL"; [ "$GPUS_PER_NODE" = 0 ] && gpus="no GPUs, gloo"
  echo "layout: $1 node(s) x $NTASKS_PER_NODE tasks ($gpus) = world $L_WORLD | TP $L_TP x PP $L_PP x DP $L_DP" \
       "| EP $L_EP$([ "$L_EXPERTS" -gt 0 ] && echo " ($((L_EXPERTS / L_EP)) of $L_EXPERTS experts per rank)")" \
       "| global batch $L_GB = micro $L_MICRO x accum $L_ACCUM x DP $L_DP ($L_TOKENS tokens/step) | $L_STEPS steps"
  [ -n "$L_WARN" ] && echo "warning: $L_WARN"
  if [ "$GPUS_PER_NODE" != 0 ] && [ "$GPUS_PER_NODE" != "$NTASKS_PER_NODE" ]; then
    echo "warning: $NTASKS_PER_NODE tasks per node on $GPUS_PER_NODE GPUs per node: expected one task per GPU"
  fi
  return 0
}

lm_dry_run() {
  local n rc=0 nodes_list; nodes_list=${NODES//,/ }
  echo "== dry run: MODEL=${MODEL:-} CONFIG=$CONFIG (run dir $RUN_DIR)"
  for n in $nodes_list; do
    echo
    echo "-- NODES=$n"
    local lay; if ! lay=$(lm_layout "$n" "$NTASKS_PER_NODE" 2>&1); then echo "$lay"; rc=3; continue; fi
    eval "$lay"
    lm_describe "$n"
    lm_srun_cmd "$n"
    echo "env: MASTER_ADDR=\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -1)${SITE_MASTER_HOST_SUFFIX:-}" \
         "MASTER_PORT=10000+(job id + 997 x restarts) % (start of the ephemeral port range - 10000), e.g. job 1234: $(SLURM_JOB_ID=1234 lm_master_port)"
    (lm_site_env; lm_site_summary)  # a subshell: the dry run exports nothing
    printf 'command:'; printf ' %q' "${SRUN_CMD[@]}"; echo
  done
  return $rc
}

# --- inside the job ---------------------------------------------------------------------------------------

lm_on_usr1() {
  LM_GOT_USR1=1
  lm_log "USR1 received (time limit near or preemption): forwarding to the training step, it checkpoints and stops at the end of this step"
  [ -n "${LM_PID:-}" ] && kill -USR1 "$LM_PID" 2>/dev/null
}

lm_on_term() {
  LM_GOT_TERM=1
  lm_log "TERM received (scancel or preemption): forwarding; no requeue from here"
  [ -n "${LM_PID:-}" ] && kill -TERM "$LM_PID" 2>/dev/null
}

lm_run_job() {
  LM_GOT_USR1=0 LM_GOT_TERM=0 LM_PID=
  trap lm_on_usr1 USR1  # first thing: an untrapped USR1 would end the batch shell
  trap lm_on_term TERM
  local lay; lay=$(lm_layout "$NODES" "$NTASKS_PER_NODE") || exit 3
  eval "$lay"
  local p missing=()
  for p in ${DATA_PREFIX//,/ }; do
    [ -f "$p.bin" ] && [ -f "$p.idx" ] || missing+=("$p.{bin,idx}")
  done
  [ -f "$TOKENIZER" ] || missing+=("$TOKENIZER")
  [ ${#missing[@]} -eq 0 ] || lm_die "missing: ${missing[*]} (set DATA_PREFIX / TOKENIZER; make them with data_tools/)"

  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -1)
  export MASTER_ADDR=${MASTER_ADDR:+$MASTER_ADDR${SITE_MASTER_HOST_SUFFIX:-}}
  export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  MASTER_PORT=$(lm_master_port); export MASTER_PORT
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export PYTHONUNBUFFERED=1
  lm_site_env

  local start; start=$(lm_latest_step "$L_CKPT_DIR")
  lm_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0} nodes $SLURM_JOB_NODELIST" \
         "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
  lm_describe "$NODES"
  lm_log "$(lm_site_summary)"
  lm_log "run dir $L_RUN_DIR, checkpoints $L_CKPT_DIR: $([ "$start" -gt 0 ] && echo "resuming from step $start" || echo "fresh start")"
  if [ "$start" -ge "$L_STEPS" ]; then
    lm_log "finished already (latest step $start >= train.steps $L_STEPS): nothing to do"
    echo "== loopmoe job end: rc=0 action=done step=$start/$L_STEPS"
    exit 0
  fi
  lm_srun_cmd "$NODES"
  printf '%s [loopmoe-slurm] command:' "$(date +%H:%M:%S)"; printf ' %q' "${SRUN_CMD[@]}"; echo

  if [ "$LM_GOT_USR1$LM_GOT_TERM" != 00 ]; then
    lm_log "signalled before the launch: not starting"; echo "== loopmoe job end: rc=0 action=exit step=$start/$L_STEPS"
    exit 0
  fi
  "${SRUN_CMD[@]}" &
  LM_PID=$!
  local rc s
  while :; do  # a trapped signal interrupts `wait`: wait again until the step has really exited
    wait "$LM_PID"; s=$?
    if kill -0 "$LM_PID" 2>/dev/null; then continue; fi
    if [ $s -gt 128 ]; then wait "$LM_PID" 2>/dev/null; rc=$?; [ $rc = 127 ] && rc=$s; else rc=$s; fi
    break
  done
  trap - USR1 TERM

  local end; end=$(lm_latest_step "$L_CKPT_DIR")
  # Requeue when the run stopped early because of a signal: USR1 reached this shell, or the step exited 0
  # before train.steps (a USR1 sent to the tasks only) - but not after TERM (scancel; Slurm requeues
  # preempted jobs itself), not at a train.exit_interval stop, and not when this run made no progress.
  local action=exit planned=0
  if [ "$L_EXIT_INTERVAL" -gt 0 ] && [ $((end % L_EXIT_INTERVAL)) = 0 ] && [ "$LM_GOT_USR1" = 0 ]; then planned=1; fi
  if [ "$end" -ge "$L_STEPS" ]; then
    action=done
  elif [ "$LM_GOT_TERM" = 0 ] && [ "$planned" = 0 ] && { [ "$LM_GOT_USR1" = 1 ] || [ "$rc" = 0 ]; }; then
    if [ "$end" -gt "$start" ]; then
      action=requeue
    else
      lm_log "no progress in this run (latest step still $end): not requeueing, to avoid a requeue loop"
    fi
  fi
  lm_log "training step exited with rc=$rc; latest checkpoint step $end of $L_STEPS; action: $action"
  echo "== loopmoe job end: rc=$rc action=$action step=$end/$L_STEPS"
  case $action in
    done) exit "$rc" ;;
    requeue)
      lm_log "requeueing job $SLURM_JOB_ID: the next run resumes from step $end"
      scontrol requeue "$SLURM_JOB_ID" || lm_die "scontrol requeue $SLURM_JOB_ID failed; resubmit by hand"
      exit 0 ;;
    *) exit "$rc" ;;
  esac
}

loopmoe_main() {
  lm_setup
  if [ "${DRY_RUN:-0}" != 0 ]; then
    lm_dry_run; exit $?
  fi
  [ -n "${SLURM_JOB_ID:-}" ] || lm_die "not inside a Slurm job: submit with sbatch, or use DRY_RUN=1 NODES=1,4,16 to see the layout"
  lm_run_job
}
