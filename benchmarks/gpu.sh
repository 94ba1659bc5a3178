#!/usr/bin/env bash
# The masked-LM step on one GPU, in one command, under 5 minutes: a bert-base-sized encoder built
# from BertConfig() (random weights, nothing downloaded), 512 tokens, bf16 autocast, sdpa attention,
# our loop against the stock recipe (benchmarks/mlm_throughput.py; random word pieces in notes of
# the real MTSamples lengths, so neither data nor tokenizer is needed). Prints the JSON figures and
# one line: model FLOP/s, MFU against the device's measured bf16 matmul peak and against
# 989 TFLOP/s (H100/H200 dense bf16), and the ratio to the stock recipe.
#
#   bash benchmarks/gpu.sh                       # on a GPU node (needs torch with CUDA, transformers, medclf's deps)
#   bash benchmarks/gpu.sh --output gpu.json     # also write the figures as JSON
#   bash benchmarks/gpu.sh --cpu                 # CPU smoke test at tiny sizes (CI: tests/test_benchmarks.py)
#   bash benchmarks/gpu.sh --cpu --steps 1       # any further option goes to mlm_throughput.py (last one wins)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

args=(--config bert-base --tokens random --attn sdpa --max-length 512)
if [ "${1:-}" = --cpu ]; then
  shift
  # The same code path at sizes a CI machine runs in seconds; the figures mean nothing there.
  args+=(--cpu --layers 2 --max-length 64 --batch 1 --steps 2 --peak-seconds 0.5)
  limit=240
else
  python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu.sh: torch sees no CUDA device (--cpu runs the CPU smoke test)")'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  args+=(--bf16 --batch 32 --steps 40)
  limit=290
fi
exec timeout "$limit" python benchmarks/mlm_throughput.py "${args[@]}" "$@"
