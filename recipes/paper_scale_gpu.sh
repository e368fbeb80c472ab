#!/usr/bin/env bash
# The paper-scale LATA experiment with one command, on a machine with one 80 GB GPU and hub access:
# download a 7-9B base, train the four LoRAs (instruct, math, code, shout) for three seeds with
# recipes/train_adapters.py, then run recipes/experiments/paper-scale-gpu.yaml (every method and
# lambda, GSM8K exact match, HumanEval pass@1, NLLs) and write its section of docs/RESULTS.md.
#
#   LATA_BASE_ID=meta-llama/Llama-3.1-8B bash recipes/paper_scale_gpu.sh        # Llama family
#   LATA_BASE_ID=google/gemma-2-9b bash recipes/paper_scale_gpu.sh              # Gemma family
#
# Gated models need `hf auth login` first. Everything resumes: a base or an adapter set that is
# already there is kept, and the experiment skips the runs in its results file.
set -euo pipefail
cd "$(dirname "$0")/.."

export LATA_BASE_ID="${LATA_BASE_ID:-meta-llama/Llama-3.1-8B}"
export LATA_NAME="${LATA_NAME:-$(basename "$LATA_BASE_ID" | tr '[:upper:]' '[:lower:]')}"
export LATA_CACHE="${LATA_CACHE:-$HOME/.cache/lata_peft}"
STEPS="${STEPS:-500}"
SEEDS="${SEEDS:-0 1 2}"
if [ -z "${LATA_PEFT_DATA:-}" ]; then
  if [ -d ../shared/data ]; then LATA_PEFT_DATA="$(cd ../shared/data && pwd)"; else LATA_PEFT_DATA="$LATA_CACHE/data"; fi
fi
export LATA_PEFT_DATA
python recipes/fetch_data.py --out "$LATA_PEFT_DATA"   # a no-op where every file is there

base="$LATA_CACHE/$LATA_NAME"
# always run: hf download resumes a partial download and does nothing when the files are there
hf download "$LATA_BASE_ID" --local-dir "$base" --exclude "original/*" --exclude "*.pth"
for seed in $SEEDS; do
  out="$LATA_CACHE/adapters/$LATA_NAME/seed$seed"
  if [ ! -f "$out/shout/adapter_config.json" ]; then
    python recipes/train_adapters.py --base "$base" --hub-id "$LATA_BASE_ID" --data "$LATA_PEFT_DATA" \
      --device cuda --autocast bf16 --gradient-checkpointing \
      --steps "$STEPS" --batch-size 8 --max-len 512 --seed "$seed" --threads 8 --out "$out"
  fi
done
lata-peft compare recipes/experiments/paper-scale-gpu.yaml
