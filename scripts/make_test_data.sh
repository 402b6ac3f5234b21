#!/usr/bin/env bash
# Tiny token data for the launcher / Slurm tests: a 1,024-piece tokenizer trained on a slice of the demo corpus
# and that slice as Megatron .bin/.idx, made by our own data tools (the approach of tests/test_train.py).
#   bash scripts/make_test_data.sh OUT_DIR [N_DOCS=1500] [VOCAB=1024]
# Writes OUT_DIR/tok.model and OUT_DIR/docs_text_document.{bin,idx}; does nothing when they exist.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:?usage: make_test_data.sh OUT_DIR [N_DOCS] [VOCAB]}
N=${2:-1500}
VOCAB=${3:-1024}
PY=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
CORPUS=$ROOT/data/corpus/python_docs.jsonl
[ -f "$CORPUS" ] || { echo "error: $CORPUS missing: make corpus" >&2; exit 1; }
if [ -f "$OUT/tok.model" ] && [ -f "$OUT/docs_text_document.idx" ]; then exit 0; fi
mkdir -p "$OUT"
head -n "$N" "$CORPUS" > "$OUT/slice.jsonl"
cd "$ROOT"
"$PY" data_tools/train_tokenizer.py --input "$OUT/slice.jsonl" --vocab-size "$VOCAB" --output-prefix "$OUT/tok" --overwrite >/dev/null
"$PY" data_tools/preprocess.py --input "$OUT/slice.jsonl" --tokenizer-model "$OUT/tok.model" \
  --output-prefix "$OUT/docs" --append-eod --workers 1 --overwrite >/dev/null
echo "$OUT/docs_text_document $OUT/tok.model"
