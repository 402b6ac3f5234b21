#!/usr/bin/env bash
# `make demo`: the main job end to end on the CPU, on the embedded default (configs/tiny_loopmoe.yaml).
# corpus -> tokenizer -> .bin/.idx -> train a tiny LoopMoE -> checkpoint -> sample.
# Each step is skipped when its output exists, so a second `make demo` goes straight to training.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_DIR:-data/demo}
RUN=${DEMO_RUN:-runs/demo}
STEPS=${DEMO_STEPS:-300}
CORPUS=data/corpus/python_docs.jsonl
mkdir -p "$OUT"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1/4 tokenizer: sentencepiece BPE, 4096 pieces, trained on $CORPUS"
if [ ! -f "$OUT/tokenizer.model" ]; then
  $PY data_tools/train_tokenizer.py --input "$CORPUS" --vocab-size 4096 --output-prefix "$OUT/tokenizer"
else echo "exists: $OUT/tokenizer.model"; fi

say "2/4 preprocess: $CORPUS -> Megatron .bin/.idx (2 workers)"
if [ ! -f "$OUT/python_docs_text_document.idx" ]; then
  $PY data_tools/preprocess.py --input "$CORPUS" --json-keys text --tokenizer-model "$OUT/tokenizer.model" \
    --output-prefix "$OUT/python_docs" --append-eod --workers 2
else echo "exists: $OUT/python_docs_text_document.{bin,idx}"; fi

say "3/4 train: tiny LoopMoE (1 prelude + 2 loop layers x 2 iterations + 1 coda), $STEPS steps on the CPU"
rm -rf "$RUN"
$PY pretrain_loopmoe.py --config configs/tiny_loopmoe.yaml \
  data.prefixes="$OUT/python_docs_text_document" data.tokenizer_model="$OUT/tokenizer.model" \
  logging.run_dir="$RUN" train.steps="$STEPS" checkpoint.interval=100

say "4/4 sample from the checkpoint (KV cache; temperature 0.8, top-k 40)"
$PY -m loopmoe.generate --checkpoint "$RUN/checkpoints" --prompt "The Python standard library" \
  --max-new-tokens 60 --temperature 0.8 --top-k 40 --seed 0

say "artefacts"
echo "tokenizer:    $OUT/tokenizer.model"
echo "token files:  $OUT/python_docs_text_document.{bin,idx}"
echo "run:          $RUN (config.yaml, metrics.jsonl, tensorboard/)"
echo "checkpoints:  $RUN/checkpoints (latest -> $(cat "$RUN/checkpoints/latest"))"
