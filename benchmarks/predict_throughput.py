"""Prediction throughput (notes/s): length-sorted batches with dynamic padding against padding every batch to 512.

    python benchmarks/predict_throughput.py --notes 256                 # MiniLM from the minilm extra

Both paths run the same classifier (encoder + head, eval mode) over the same notes, drawn from
all of MTSamples in file order (new notes of every specialty); only batching and padding
differ. Prints one JSON line with both throughputs and the ratio, by wall time and by CPU time
(the machine may be shared).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--notes", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    df = data.clean(data.read_table(args.data, [data.TEXT, data.SPECIALTY]))
    texts = df[data.TEXT].tolist()[: args.notes]
    accelerator = runtime.make_accelerator()
    encoder, tokenizer, _ = load_encoder(args.model)
    runtime.seed_everything(0)
    model = Classifier(encoder, Head(encoder.config.hidden_size, 6), "cls", frozen=True).eval()

    def classify(**batching) -> tuple[float, float, torch.Tensor]:
        started, cpu = time.perf_counter(), time.process_time()
        vectors = features.encode(model, tokenizer, texts, args.max_length, args.batch_size, accelerator, **batching)
        with torch.no_grad():
            probs = torch.softmax(model.head(vectors), -1)
        return len(texts) / (time.perf_counter() - started), len(texts) / (time.process_time() - cpu), probs

    padded_rate, padded_cpu_rate, padded = classify(sort_by_length=False, pad_to=args.max_length)
    sorted_rate, sorted_cpu_rate, ours = classify()
    lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]]
    print(
        json.dumps(
            {
                "benchmark": "predict_throughput",
                "model": args.model,
                "notes": len(texts),
                "batch_size": args.batch_size,
                "max_length": args.max_length,
                "mean_tokens": round(sum(lengths) / len(lengths), 1),
                "share_at_max_length": round(sum(n == args.max_length for n in lengths) / len(lengths), 3),
                "padded_notes_per_s": round(padded_rate, 2),
                "sorted_notes_per_s": round(sorted_rate, 2),
                "ratio": round(sorted_rate / padded_rate, 2),
                "cpu_ratio": round(sorted_cpu_rate / padded_cpu_rate, 2),
                "max_prob_gap": (padded - ours).abs().max().item(),
            }
        )
    )


if __name__ == "__main__":
    main()
