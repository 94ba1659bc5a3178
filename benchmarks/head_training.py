"""Head training, 8 epochs: the original way against ours, same encoder, data and head settings.

    python benchmarks/head_training.py --notes 200                       # MiniLM from the minilm extra

Original: the frozen encoder re-run over every note, padded to 512, in every epoch.
Ours: each distinct note encoded once (eval mode, length-sorted batches, dynamic padding), then
the head trained on the cached vectors. Prints one JSON line with both wall times and CPU
times (the machine may be shared) and their ratios.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import torch
from torch.utils.data import TensorDataset

from medclf import config, data, features, prepare, runtime
from medclf.classifier import Classifier, Head, load_encoder
from medclf.head import fit

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "mtsamples.csv.xz"  # shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--notes", type=int, default=200, help="training rows (first N of the prepared train split)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        prepare.run(config.load("prepare", None, [f"out={out}", f"prepare.input={args.data}"]))
        classes = data.read_labels(f"{out}/prepare/labels.json")
        df, y = data.read_labeled(f"{out}/prepare/train.csv", classes, config.DatasetSpec())
    df, y = df.iloc[: args.notes], torch.tensor(y[: args.notes])
    texts = df[data.TEXT].tolist()
    accelerator = runtime.make_accelerator()
    encoder, tokenizer, _ = load_encoder(args.model)
    hidden = encoder.config.hidden_size
    settings = dict(epochs=args.epochs, batch_size=24, lr=1e-3, seed=0)

    # -- the original: every epoch runs the frozen encoder over inputs padded to max_length
    started, cpu = time.perf_counter(), time.process_time()
    batch = tokenizer(texts, truncation=True, max_length=args.max_length, padding="max_length", return_tensors="pt")
    runtime.seed_everything(0)
    original = Classifier(encoder, Head(hidden, len(classes)), "cls", frozen=True)
    fit(accelerator, original, TensorDataset(batch["input_ids"], batch["attention_mask"], y), **settings)
    original_s, original_cpu = time.perf_counter() - started, time.process_time() - cpu

    # -- ours: encode each distinct text once (length-sorted, dynamic padding), train on the vectors
    started, cpu = time.perf_counter(), time.process_time()
    runtime.seed_everything(0)
    ours = Classifier(encoder, Head(hidden, len(classes)), "cls", frozen=True)
    vectors = features.encode(ours, tokenizer, texts, args.max_length, 32, accelerator)
    fit(accelerator, ours.head, TensorDataset(vectors, y), **settings)
    ours_s, ours_cpu = time.perf_counter() - started, time.process_time() - cpu

    # Same init, order and dropout: the two heads must agree, or the comparison is meaningless.
    with torch.no_grad():
        gap = (original.head.eval()(vectors) - ours.head.eval()(vectors)).abs().max().item()
    print(
        json.dumps(
            {
                "benchmark": "head_training",
                "model": args.model,
                "rows": len(texts),
                "distinct_texts": len(set(texts)),
                "epochs": args.epochs,
                "max_length": args.max_length,
                "threads": torch.get_num_threads(),
                "original_s": round(original_s, 1),
                "ours_s": round(ours_s, 1),
                "ratio": round(original_s / ours_s, 2),
                "original_cpu_s": round(original_cpu, 1),
                "ours_cpu_s": round(ours_cpu, 1),
                "cpu_ratio": round(original_cpu / ours_cpu, 2),
                "max_logit_gap": gap,
            }
        )
    )


if __name__ == "__main__":
    main()
