"""Masked-LM at corpus scale: memory per rank stays flat as the corpus grows, on 2 gloo ranks.

    python benchmarks/mlm_corpus_scale.py                      # 10,000 and 100,000 notes (about 70M tokens)
    python benchmarks/mlm_corpus_scale.py --notes 500          # a smoke run

For each size, a synthetic corpus of N notes is built from the MTSamples transcriptions (in order,
repeated as often as needed, each copy made distinct by a numbered first line so that
deduplication cannot shrink it) as `<out>/prepare/train.csv`, with 200 real notes as validation.
Then `medclf mlm` runs on 2 CPU ranks (`accelerate launch --multi_gpu --num_processes 2` with
ACCELERATE_USE_CPU=1: gloo) with all-MiniLM-L6-v2 for a few steps: the ranks tokenize their shares
of the corpus into the token store, then train from it by memory-map with DataLoader workers
masking ahead. Measured: each rank's peak resident memory (VmHWM, read from /proc while it
runs; also as it stood once tokenizing was done; its DataLoader workers separately), the
tokenization rate of both ranks together (the store's tokens over the main rank's tokenizing
time), the time from the job's start to its first optimizer step (from metrics.json) and the
launch's wall time. Prints one JSON line; the target
is a peak under 2 GiB per rank at every size.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pandas as pd

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "mtsamples.csv.xz"  # shipped
sys.path.insert(0, str(REPO / "benchmarks"))
from predict_memory import write_notes  # noqa: E402 - the same synthetic notes as the predict benchmark


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))
    except (OSError, StopIteration, ValueError):
        return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class PeakWatcher(threading.Thread):
    """Samples the launcher's process tree: each rank's (its children) and each worker's peak RSS."""

    def __init__(self, launcher: int):
        super().__init__(daemon=True)
        self.launcher, self.done = launcher, threading.Event()
        self.ranks: dict[int, int] = {}  # pid -> VmHWM (KiB), a high-water mark: the last reading is the peak
        self.workers: dict[int, int] = {}

    def run(self) -> None:
        while not self.done.is_set():
            for rank in self._ranks():
                self.ranks[rank] = max(self.ranks.get(rank, 0), status_kib(rank, "VmHWM"))
                for worker in children(rank):
                    self.workers[worker] = max(self.workers.get(worker, 0), status_kib(worker, "VmHWM"))
            time.sleep(0.2)

    def _ranks(self) -> list[int]:
        # accelerate launch runs torch's elastic agent in its own process; the ranks are its children
        # (running python -m medclf), possibly below one more level of launcher.
        found, todo = [], children(self.launcher)
        while todo:
            pid = todo.pop()
            try:
                command = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"medclf" in command and b"mlm" in command and pid not in self.workers:
                found.append(pid)
            else:
                todo += children(pid)
        return found


def training_tokens(cache: pathlib.Path) -> int:
    """The tokens of the training text's store (its first shard comes from train.csv)."""
    for store in cache.iterdir():
        if json.loads((store / "shard-000000.json").read_text())["source"].endswith("train.csv"):
            return json.loads((store / "manifest.json").read_text())["tokens"]
    raise SystemExit(f"{cache}: no token store of train.csv")


def run_mlm(out: pathlib.Path, args: argparse.Namespace) -> dict:
    """`medclf mlm` on 2 gloo ranks (PLATFORM.md: --multi_gpu with ACCELERATE_USE_CPU=1), watched."""
    launch = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no".split()
    job = (
        f"out={out} model={args.model} max_length={args.max_length} max_steps={args.steps} shard_rows={args.shard_rows}"
    )
    settings = "batch_size=4 micro_batch_size=2 eval_blocks=4 log_every=1 checkpoint_every=1000"
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port", str(free_port())]
    command += ["-m", "medclf", "mlm", *job.split(), *settings.split()]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watcher = PeakWatcher(launcher.pid)
    watcher.start()
    lines, after_tokenizing = [], {}
    assert launcher.stderr is not None
    for line in launcher.stderr:
        lines.append(line)
        if "medclf.mlm: train: " in line:  # logged once both stores are built: the tokenizing phase's peaks
            after_tokenizing = {pid: status_kib(pid, "VmHWM") for pid in watcher._ranks()}
    launcher.wait()
    err = "".join(lines[-2000:])
    wall = time.perf_counter() - started
    watcher.done.set()
    watcher.join()
    if launcher.returncode != 0:
        errors = [line for line in err.splitlines() if "medclf mlm: error:" in line]
        raise SystemExit(f"mlm failed with status {launcher.returncode}: {errors or err[-3000:]}")
    return {
        "wall_seconds": wall,
        "rank_peaks_kib": sorted(watcher.ranks.values()),
        "rank_peaks_through_tokenizing_kib": sorted(after_tokenizing.values()),
        "workers": watcher.workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--notes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shard-rows", type=int, default=8192)
    args = parser.parse_args()

    table = pd.read_csv(args.data, dtype=str, keep_default_na=False)
    texts = [t for t in table["transcription"] if t.strip()]
    results = []
    for n in args.notes:
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "run"
            (out / "prepare").mkdir(parents=True)
            size = write_notes(out / "prepare" / "train.csv", texts, n)
            pd.DataFrame({"transcription": texts[-200:]}).to_csv(out / "prepare" / "validation.csv", index=False)
            measured = run_mlm(out, args)
            metrics = json.loads((out / "mlm" / "metrics.json").read_text())
            tokens = training_tokens(out / "cache")
        tokenization = metrics["tokenization"]
        peaks = measured["rank_peaks_kib"]
        results.append(
            {
                "notes": n,
                "input_mib": round(size / 2**20, 1),
                "tokens": tokens,
                "rank_peak_rss_mib": [round(kib / 1024, 1) for kib in peaks],
                "rank_peak_rss_through_tokenizing_mib": [
                    round(kib / 1024, 1) for kib in measured["rank_peaks_through_tokenizing_kib"]
                ],
                "worker_peak_rss_mib": round(max(measured["workers"].values(), default=0) / 1024, 1),
                "tokenize_seconds": round(tokenization["seconds"], 1),
                "tokenize_tokens_per_s": round(tokens / tokenization["seconds"]),
                "seconds_to_first_step": round(metrics["seconds_to_first_step"], 1),
                "wall_seconds": round(measured["wall_seconds"], 1),
                "steps": metrics["steps"],
                "world_size": metrics["world_size"],
            }
        )
        print(json.dumps(results[-1]), file=sys.stderr)
    largest = max(max(r["rank_peak_rss_mib"]) for r in results)
    smallest = max(results[0]["rank_peak_rss_mib"])
    print(
        json.dumps(
            {
                "benchmark": "mlm_corpus_scale",
                "model": args.model,
                "max_length": args.max_length,
                "shard_rows": args.shard_rows,
                "runs": results,
                "peak_ratio_largest_to_smallest": round(largest / smallest, 3),
                "under_2_gib": largest < 2048,
            }
        )
    )


if __name__ == "__main__":
    main()
