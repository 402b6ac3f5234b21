#!/usr/bin/env bash
# `make demo`: the main job end to end on the CPU, on the embedded default (configs/tiny_loopmoe.yaml).
# corpus -> tokenizer -> .bin/.idx -> train a tiny LoopMoE -> checkpoint -> sample.
# The tokenizer and token files are skipped when they exist, so a second `make demo` goes straight to
# training. Every invocation trains into a NEW run directory, runs/demo-<date>-<time> (runs/demo-latest
# points to the newest): a second `make demo` never deletes the first one's checkpoints or export.
#   DEMO_STEPS=N   training steps (default 1000)     DEMO_RUN=DIR  the run directory (refused if it exists,
#   DEMO_DIR=DIR   tokenizer + token files             unless DEMO_FRESH=1, which deletes it first)
#   DEMO_PLAN=1    print the run directory it would use and stop (tests/test_readme.py checks the choice)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${DEMO_DIR:-data/demo}
STEPS=${DEMO_STEPS:-1000}
CORPUS=data/corpus/python_docs.jsonl
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# The run directory: DEMO_RUN as given (an existing one only with DEMO_FRESH=1), else a new dated one.
if [ -n "${DEMO_RUN:-}" ]; then
  RUN=$DEMO_RUN
  if [ -e "$RUN" ] && [ "${DEMO_FRESH:-0}" != 1 ]; then
    echo "demo: $RUN exists (a previous run's checkpoints and export); set DEMO_RUN to a new directory," >&2
    echo "      leave DEMO_RUN unset (a new runs/demo-<date>-<time>), or DEMO_FRESH=1 to delete and replace it" >&2
    exit 2
  fi
else
  RUN=runs/demo-$(date +%Y%m%d-%H%M%S)
  n=1
  while [ -e "$RUN" ]; do RUN=runs/demo-$(date +%Y%m%d-%H%M%S)-$n; n=$((n + 1)); done
fi
echo "demo: outputs go to $RUN (earlier runs are kept; runs/demo-latest will point here)"
if [ "${DEMO_PLAN:-0}" = 1 ]; then exit 0; fi
if [ -e "$RUN" ]; then rm -rf "$RUN"; fi  # only reached with DEMO_FRESH=1: asked for
mkdir -p "$OUT" "$RUN" runs
ln -sfn "$(cd "$RUN" && pwd)" runs/demo-latest

say "1/7 tokenizer: sentencepiece BPE, 4096 pieces, trained on $CORPUS"
if [ ! -f "$OUT/tokenizer.model" ]; then
  $PY data_tools/train_tokenizer.py --input "$CORPUS" --vocab-size 4096 --output-prefix "$OUT/tokenizer"
else echo "exists: $OUT/tokenizer.model"; fi

say "2/7 preprocess: $CORPUS -> Megatron .bin/.idx (2 workers)"
if [ ! -f "$OUT/python_docs_text_document.idx" ]; then
  $PY data_tools/preprocess.py --input "$CORPUS" --json-keys text --tokenizer-model "$OUT/tokenizer.model" \
    --output-prefix "$OUT/python_docs" --append-eod --workers 2
else echo "exists: $OUT/python_docs_text_document.{bin,idx}"; fi

say "3/7 train: tiny LoopMoE (1 prelude + 2 loop layers x 2 iterations + 1 coda), $STEPS steps on the CPU"
$PY pretrain_loopmoe.py --config configs/tiny_loopmoe.yaml \
  data.prefixes="$OUT/python_docs_text_document" data.tokenizer_model="$OUT/tokenizer.model" \
  logging.run_dir="$RUN" train.steps="$STEPS" checkpoint.interval=250 train.eval_interval=100 train.log_interval=50

say "4/7 sample from the checkpoint (KV cache; temperature 0.8, top-k 40)"
$PY -m loopmoe.generate --checkpoint "$RUN/checkpoints" --prompt "The Python standard library" \
  --max-new-tokens 60 --temperature 0.8 --top-k 40 --seed 0

say "5/7 export to Hugging Face format, then sample through transformers (trust_remote_code)"
$PY -m loopmoe.export.hf --checkpoint "$RUN/checkpoints" --out "$RUN/hf"
$PY - "$RUN/hf" <<'PYEOF'
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
prompt = "The Python standard library"
ids = tok(prompt, return_tensors="pt").input_ids
ids = torch.cat([torch.tensor([[tok.eos_token_id]]), ids], dim=1)  # a new document starts after EOS
torch.manual_seed(0)
out = model.generate(ids, max_new_tokens=60, do_sample=True, temperature=0.8, top_k=40,
                     pad_token_id=tok.pad_token_id)
print(f"--- transformers {type(model).__name__} sample:")
print(tok.decode(out[0, 1:], skip_special_tokens=True))
PYEOF

say "6/7 lm-evaluation-harness on the export (the shipped 20-question task; offline)"
$PY -m loopmoe.eval --model "$RUN/hf" --tasks loopmoe_tiny_mc
echo "the paper's nine benchmarks, once their data files are local (see docs/export.md):"
echo "  $PY -m loopmoe.eval --model $RUN/hf --tasks loopmoe_paper --data-dir DATA_DIR"
echo "or plain lm-eval: lm_eval --model hf --model_args pretrained=$RUN/hf,trust_remote_code=True --tasks piqa"

say "7/7 curves of the run: python -m loopmoe.plot $RUN"
$PY -m loopmoe.plot "$RUN"

say "artefacts"
echo "tokenizer:    $OUT/tokenizer.model"
echo "token files:  $OUT/python_docs_text_document.{bin,idx}"
echo "run:          $RUN (config.yaml, metrics.jsonl, tensorboard/)"
echo "plots:        $RUN/plots/{loss,lr,grad_norm,throughput,routing}.png"
echo "checkpoints:  $RUN/checkpoints (latest -> $(cat "$RUN/checkpoints/latest"))"
echo "export:       $RUN/hf (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"
echo "latest run:   runs/demo-latest -> $RUN (a new make demo trains into a new directory; this one stays)"
