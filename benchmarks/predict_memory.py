"""Peak memory of `medclf predict` as the input grows: notes are streamed in chunks, so memory stays flat.

    python benchmarks/predict_memory.py                              # 10,000 and 100,000 notes
    python benchmarks/predict_memory.py --notes 2000 20000 --whole-file-too

A tiny classifier (the 2-layer, hidden-32 BERT of tests/tiny.py with an untrained head, max_length
32) classifies N notes: the real MTSamples transcriptions repeated in order, each copy made
distinct by a numbered first line so that deduplication cannot shrink the work. Each size runs
`python -m medclf predict` as its own child process, whose peak resident memory (ru_maxrss)
comes from wait4(); its resident memory is also read after every chunk it writes (a leak would
climb from chunk to chunk). `--whole-file-too` adds a
run of the largest input read as one chunk (chunk_rows = N): what reading everything at once
would cost. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import pandas as pd

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "mtsamples.csv.xz"  # shipped
sys.path.insert(0, str(REPO))  # tests/tiny.py builds the tiny BERT


def write_notes(path: pathlib.Path, texts: list[str], n: int) -> int:
    """N notes in file order, repeated as often as needed; returns the file's size in bytes."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        for begin in range(0, n, 10_000):
            rows = range(begin, min(begin + 10_000, n))
            part = pd.DataFrame(
                {
                    "note_id": [f"n{i}" for i in rows],
                    "transcription": [f"Note {i}.\n{texts[i % len(texts)]}" for i in rows],
                }
            )
            part.to_csv(f, index=False, header=begin == 0)
    return path.stat().st_size


def make_classifier(folder: pathlib.Path, data: pathlib.Path, max_length: int) -> pathlib.Path:
    from medclf import classifier, runtime
    from tests.helpers import make_tiny_bert

    (folder / "tiny-bert").mkdir()
    encoder_dir = make_tiny_bert(folder / "tiny-bert", data)
    _, _, where = classifier.load_encoder(str(encoder_dir))
    runtime.seed_everything(0)
    classes = ["Surgery", "Consult", "Cardiovascular", "Orthopedic", "Radiology", "General Medicine"]
    info = classifier.ClassifierInfo(
        classes=classes,
        encoder=str(encoder_dir),
        encoder_fingerprint=classifier.fingerprint(where),
        pooling="cls",
        max_length=max_length,
        hidden_size=32,
        dropout=0.2,
        frozen=True,
    )
    classifier.save(str(folder / "classifier"), classifier.Head(32, len(classes)), info)
    return folder / "classifier"


def predict(model: pathlib.Path, notes: pathlib.Path, output: pathlib.Path, chunk_rows: int, batch_size: int) -> dict:
    """Run the predict job as a child process; its peak RSS and wall time."""
    command = [
        sys.executable,
        "-m",
        "medclf",
        "predict",
        f"model={model}",
        f"input={notes}",
        f"output={output}",
        f"chunk_rows={chunk_rows}",
        f"batch_size={batch_size}",
        "overwrite=true",
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Resident memory each time a chunk has been written: a leak would climb from chunk to chunk.
    after_chunks = [resident_mib(child.pid) for line in child.stderr if "rows classified" in line]
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"predict failed with status {os.waitstatus_to_exitcode(status)}: {' '.join(command)}")
    rows = sum(1 for _ in open(output, encoding="utf-8")) - 1
    return {
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "rss_after_each_chunk_mib": after_chunks,
        "seconds": round(seconds, 1),
        "rows_out": rows,
    }


def resident_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0.0
    return round(kib / 1024, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--notes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--chunk-rows", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--whole-file-too", action="store_true", help="also read the largest input as one chunk")
    args = parser.parse_args()

    texts = pd.read_csv(args.data, dtype=str, keep_default_na=False)["transcription"]
    texts = [t for t in texts if t.strip()]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        model = make_classifier(folder, pathlib.Path(args.data), args.max_length)
        runs = [(n, args.chunk_rows) for n in args.notes]
        if args.whole_file_too:
            runs.append((max(args.notes), max(args.notes)))
        for n, chunk_rows in runs:
            notes = folder / f"notes-{n}.csv"
            size = notes.stat().st_size if notes.exists() else write_notes(notes, texts, n)
            result = predict(model, notes, folder / "predictions.csv", chunk_rows, args.batch_size)
            assert result["rows_out"] == n, result
            results.append(
                {
                    "notes": n,
                    "input_mib": round(size / 2**20, 1),
                    "chunk_rows": chunk_rows,
                    **result,
                    "notes_per_s": round(n / result["seconds"], 1),
                }
            )
            print(json.dumps(results[-1]), file=sys.stderr)
    chunked = [r["peak_rss_mib"] for r in results if r["chunk_rows"] == args.chunk_rows]
    print(
        json.dumps(
            {
                "benchmark": "predict_memory",
                "max_length": args.max_length,
                "batch_size": args.batch_size,
                "runs": results,
                "peak_ratio_largest_to_smallest": round(chunked[-1] / chunked[0], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
