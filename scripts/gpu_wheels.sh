#!/usr/bin/env bash
# `make gpu-wheels`: the wheels `make gpu-check` installs OFFLINE on a GPU machine that has CUDA torch
# but neither megatron-core nor DeepSpeed (nor network). Run it here, where PyPI is reachable; the
# wheels/ directory then travels with the working tree (it is git-ignored, under 64 MiB).
#
# Versions are pinned to what this project's virtual environment runs (pyproject.toml / constraints.txt).
# Compiled packages are fetched for several CPython versions (GPU_PYTHONS), since the GPU machine's
# Python is not known here; DeepSpeed ships only a source tarball, so it is built into a pure wheel
# (DS_BUILD_OPS=0: its CUDA ops are JIT-built on first use, and our code uses none of them).
# torchao (a 3.4 MB abi3 wheel) is brought along: FP8 training through torchao runs in gpu-check.
# Transformer Engine is NOT brought along (a ~730 MB CUDA wheel): gpu-check reports FP8 with TE as skipped.
# Last, the check's data goes to wheels/gpu_data/ (a tokenizer and .bin/.idx of the demo corpus, ~3 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${WHEELS_DIR:-wheels}
PYTHONS=${GPU_PYTHONS:-"3.10 3.11 3.12"}
LIMIT_MIB=${WHEELS_LIMIT_MIB:-64}
PIP="$PY -m pip"

ver() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }

# name==version of every package below, as installed in this venv
BINARY=(megatron-core msgpack pydantic-core pyyaml psutil sentencepiece safetensors ninja torchao)
PURE=(hjson py-cpuinfo pydantic annotated-types typing-inspection typing-extensions einops tqdm packaging
      pytest pytest-timeout pluggy iniconfig)
pin() { for p in "$@"; do echo "$p==$(ver "$p")"; done; }

mkdir -p "$OUT"
echo "== gpu-wheels: pure-Python wheels"
$PIP download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$OUT" $(pin "${PURE[@]}")
for v in $PYTHONS; do
  echo "== gpu-wheels: compiled wheels for CPython $v (manylinux x86_64)"
  $PIP download -q --disable-pip-version-check --no-deps --only-binary=:all: -d "$OUT" \
    --python-version "$v" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 $(pin "${BINARY[@]}")
done
DS=$(ver deepspeed)
if ! ls "$OUT"/deepspeed-"$DS"-py3-none-any.whl >/dev/null 2>&1; then
  echo "== gpu-wheels: building DeepSpeed $DS into a pure wheel (DS_BUILD_OPS=0)"
  tmp=$(mktemp -d)
  $PIP download -q --disable-pip-version-check --no-deps --no-binary=:all: -d "$tmp" "deepspeed==$DS"
  DS_BUILD_OPS=0 $PIP wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$OUT" "$tmp"/deepspeed-*.tar.gz
  rm -rf "$tmp"
fi
echo "== gpu-wheels: the check's data (tokenizer + .bin/.idx of the demo corpus) into $OUT/gpu_data/"
$PY bench/gpu_check.py --prepare-data --data-dir "$OUT/gpu_data"
size=$(du -sm "$OUT" | cut -f1)
echo "== gpu-wheels: $(ls "$OUT" | wc -l) wheels, ${size} MiB in $OUT/"
if [ "$size" -gt "$LIMIT_MIB" ]; then
  echo "ERROR: $OUT/ is ${size} MiB, over the ${LIMIT_MIB} MiB that can travel with the working tree;" \
       "drop a Python version (GPU_PYTHONS=\"3.11\" make gpu-wheels)" >&2
  exit 1
fi
