#!/usr/bin/env bash
# `make gpu-check`: the prepared GPU check, for a machine with one H100/H200, CUDA torch, and neither
# megatron-core, DeepSpeed nor Transformer Engine, without network. Under 8 minutes.
#   1. installs what is missing from wheels/ (made by `make gpu-wheels`) with --no-index --no-deps into
#      .gpu_site/ (on PYTHONPATH; the machine's own site-packages are left alone);
#   2. runs bench/gpu_check.py (GPU-marked tests, bf16 steps, MFU, FP8 if TE is importable, peak memory),
#      which writes docs/benchmarks/gpu.md and says what it ran and what it skipped.
# Arguments go to bench/gpu_check.py (e.g. --dry-run --out /tmp/gpu.md or --print-commands on a CPU machine).
# On the device tool: run with carry ["wheels"] (the wheels and wheels/gpu_data travel, under 64 MiB).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || command -v python )}
WHEELS=${WHEELS_DIR:-wheels}
SITE=${GPU_SITE:-.gpu_site}
BUDGET=${GPU_CHECK_TIMEOUT:-470}  # whole check, seconds (8 minutes minus the installs)

echo "== gpu-check: python $($PY -c 'import sys; print(sys.version.split()[0])'), $($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' 2>&1)"

# import name -> distribution name (the wheels pip should look for)
declare -A DIST=([megatron.core]=megatron-core [deepspeed]=deepspeed [hjson]=hjson [cpuinfo]=py-cpuinfo
  [msgpack]=msgpack [ninja]=ninja [pydantic]=pydantic [pydantic_core]=pydantic-core
  [annotated_types]=annotated-types [typing_inspection]=typing-inspection [typing_extensions]=typing-extensions
  [einops]=einops [psutil]=psutil [tqdm]=tqdm [yaml]=pyyaml [sentencepiece]=sentencepiece
  [safetensors]=safetensors [packaging]=packaging [pytest]=pytest [pytest_timeout]=pytest-timeout
  [pluggy]=pluggy [iniconfig]=iniconfig [torchao]=torchao)
missing=()
for mod in "${!DIST[@]}"; do
  PYTHONPATH="$SITE" $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('$mod') is None)" 2>/dev/null \
    || missing+=("${DIST[$mod]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "== gpu-check: every package is already importable; nothing to install"
elif [ ! -d "$WHEELS" ]; then
  echo "== gpu-check: NOT INSTALLED (no $WHEELS/ directory; run \`make gpu-wheels\` where PyPI is reachable):" \
       "${missing[*]} -- what needs them is reported as skipped or failed below"
else
  echo "== gpu-check: installing from $WHEELS/ (offline, --no-deps) into $SITE/: ${missing[*]}"
  mkdir -p "$SITE"
  for dist in "${missing[@]}"; do  # one by one: a wheel missing for this Python stops only its own package
    $PY -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" --no-deps \
      --target "$SITE" "$dist" 2>&1 | grep -v "already exists" | tail -1 | sed "s/^/   $dist: /" || true
  done
fi
export PYTHONPATH="$PWD:$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
for mod in megatron.core deepspeed transformer_engine torchao; do
  $PY -c "import $mod" >/dev/null 2>&1 && echo "   $mod: importable" || echo "   $mod: NOT importable"
done
timeout "$BUDGET" $PY bench/gpu_check.py --budget-s $((BUDGET - 60)) "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu-check: stopped after ${BUDGET} s (time limit); the report may be missing" >&2
exit $rc
