"""Masked-batch preparation throughput: can the host keep a GPU fed?

    python benchmarks/mlm_batch_prep.py                          # 2,000 real notes, bert-base's batch at 512 tokens
    python benchmarks/mlm_batch_prep.py --notes 500 --steps 50   # a quick run

The real MTSamples notes are tokenized into a token store (medclf/tokenstore.py, MiniLM's
BERT-uncased vocabulary) and cut into blocks of 512 tokens; then the mlm job's step batches
(medclf/masking.py: StepBatches, a pure function of seed, epoch and step) are built for `--steps`
optimizer steps of `--batch` blocks: in this process (0 workers), then through `step_loader`
with `--workers` DataLoader workers, as `medclf mlm` reads them, and as one of 2 ranks (its rows
masked). Throughput is masked tokens per second of wall time,
start-up of the workers included, against the rate a GPU consumes bert-base at 512 tokens
(`--gpu-rate`, default 400,000 tokens/s): the ratio should be at least 10. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import pandas as pd
from transformers import AutoTokenizer

from medclf import models, runtime, tokenstore
from medclf.masking import Masker, Plan, StepBatches, step_loader

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "mtsamples.csv.xz"  # shipped


def measure(batches: StepBatches, workers: int) -> float:
    """Seconds to build every batch of `batches` in order, `workers` processes ahead (start-up included)."""
    started = time.perf_counter()
    with step_loader(batches, workers, pin_memory=False) as loader:
        for _ in loader:
            pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--model", default="all-MiniLM-L6-v2", help="whose tokenizer (vocabulary) to use")
    parser.add_argument("--notes", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="global batch in blocks (bert-base's usual 32)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--whole-word", action="store_true")
    parser.add_argument("--gpu-rate", type=float, default=400_000, help="tokens/s a GPU trains bert-base at")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(args.model))
    notes = pd.read_csv(args.data, dtype=str, keep_default_na=False)["transcription"]
    notes = [t for t in dict.fromkeys(notes) if t.strip()][: args.notes]
    with tempfile.TemporaryDirectory() as tmp:
        csv = pathlib.Path(tmp) / "notes.csv"
        pd.DataFrame({"transcription": notes}).to_csv(csv, index=False)
        accelerator = runtime.make_accelerator()
        started = time.perf_counter()
        built = tokenstore.build([str(csv)], "transcription", tokenizer, tmp, 1024, accelerator)
        tokenize_seconds = time.perf_counter() - started
        blocks = tokenstore.StreamBlocks(built.stream, args.max_length)
        masker = Masker(tokenizer.mask_token_id, len(tokenizer), tokenizer.all_special_ids, whole_word=args.whole_word)
        steps_per_epoch = len(blocks) // args.batch
        micro = args.batch // 4  # 4 micro-batches per step on one process, 2 on each of two

        def step_batches(world: int, rank: int) -> StepBatches:
            plan = Plan(0, args.batch, micro, steps_per_epoch, world, rank)
            return StepBatches(blocks, masker, plan, 0, args.steps)

        # name: (processes sharing the global batch, seconds for one rank's batches)
        runs = {
            "in_process": (1, measure(step_batches(1, 0), 0)),
            f"{args.workers}_workers": (1, measure(step_batches(1, 0), args.workers)),
            f"rank_of_2_{args.workers}_workers": (2, measure(step_batches(2, 0), args.workers)),
        }
    figures = {
        "benchmark": "mlm_batch_prep",
        "notes": len(notes),
        "blocks": len(blocks),
        "max_length": args.max_length,
        "global_batch_blocks": args.batch,
        "steps": args.steps,
        "whole_word": args.whole_word,
        "tokenize_tokens_per_s": round(len(built.stream) / tokenize_seconds),
        "gpu_rate_tokens_per_s": args.gpu_rate,
    }
    for name, (world, seconds) in runs.items():
        # What one rank feeds its GPU: its share of each global batch (a rank of 2 masks half the rows;
        # the training step sums the ranks' masked counts in one reduction).
        rate = args.steps * args.batch // world * args.max_length / seconds
        figures[name] = {
            "seconds": round(seconds, 3),
            "tokens_per_s": round(rate),
            "vs_gpu": round(rate / args.gpu_rate, 2),
        }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
