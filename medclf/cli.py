"""`medclf JOB [SPEC.yaml] [key=value ...] [--key value ...]`, also under `accelerate launch -m medclf`.

A bare key (`lr=1e-4`, `--model URL`) belongs to the job's own section unless it is a top-level
key (`out`, `seed`, `overwrite`); a dotted key (`mlm.lr=1e-4`) names its section.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Optional

from medclf import __version__, config, storage
from medclf.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_PREEMPTED, Diverged, MedclfError, Preempted

JOBS = {
    "prepare": ("medclf.prepare", "check, clean and split the raw CSV (MTSamples, or your own: see dataset.*)"),
    "mlm": ("medclf.mlm", "masked-LM domain adaptation of a BERT checkpoint on the training notes"),
    "tokenize": ("medclf.tokenstore", "mlm's first step alone: its token stores, sharded over every process"),
    "head": ("medclf.head", "train the classification head on a frozen (or fine-tuned) encoder"),
    "evaluate": ("medclf.evaluate", "metrics, per-class report and confusion matrix of a classifier"),
    "compare": ("medclf.compare", "adapted vs out-of-the-box encoder: heads over several seeds, statistics"),
    "predict": ("medclf.predict", "classify new notes in batch (--model URL --input CSV --output CSV)"),
    "run": ("medclf.pipeline", "the whole experiment: prepare, mlm, both heads, compare; up-to-date stages skipped"),
}

USAGE = "usage: medclf JOB [SPEC.yaml] [key=value ...] [--key value ...]"


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        sys.exit(0 if argv else EXIT_BAD_INPUT)
    if argv[0] in ("-V", "--version"):
        print(f"medclf {__version__}")
        sys.exit(0)
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        _fail("medclf", f"unknown job {job!r}; jobs: {', '.join(JOBS)}")
    if "-h" in rest or "--help" in rest:
        print(f"{USAGE}\n\nmedclf {job}: {JOBS[job][1]}\n\nkeys (key = default, then meaning):\n{config.describe(job)}")
        sys.exit(0)
    _setup_logging()
    try:
        spec_url, overrides = _split_args(rest)
        text = storage.read_text(spec_url) if spec_url else None
        spec = config.load(job, text, overrides, source=spec_url or "command line")
        storage.configure(spec.storage)
        importlib.import_module(JOBS[job][0]).run(spec)
        _end_process_group()
    except MedclfError as e:
        _fail(f"medclf {job}", str(e))
    except Diverged as e:
        _fail(f"medclf {job}", str(e), EXIT_DIVERGED)
    except Preempted as e:
        logging.getLogger("medclf").warning("stopped by signal after saving a checkpoint: %s", e)
        sys.exit(EXIT_PREEMPTED)


def _split_args(args: list[str]) -> tuple[Optional[str], list[str]]:
    spec_url, overrides = None, []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key = arg[2:]
            if "=" not in key:
                if i + 1 >= len(args):
                    raise MedclfError(f"{arg}: needs a value")
                i += 1
                key = f"{key}={args[i]}"
            name, _, value = key.partition("=")
            overrides.append(f"{name.replace('-', '_')}={value}")
        elif "=" in arg:
            overrides.append(arg)
        elif spec_url is None:
            spec_url = arg
        else:
            raise MedclfError(f"unexpected argument {arg!r} (one spec file, then key=value overrides)")
        i += 1
    return spec_url, overrides


def _end_process_group() -> None:
    """A distributed run's process group, ended once the job is done (by the CLI, not by each job:
    `medclf run` runs several jobs in one process group)."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _setup_logging() -> None:
    # Only the main process of a distributed run speaks at INFO; the others report problems.
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(who: str, message: str, status: int = EXIT_BAD_INPUT) -> None:
    # One write: the ranks of a job share one stderr, and a refusal they all reach together (the
    # preflight's) would otherwise interleave with the line breaks of the others.
    sys.stderr.write(f"{who}: error: {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def _overview() -> str:
    jobs = "\n".join(f"  {name:<9} {about}" for name, (_, about) in JOBS.items())
    return (
        f"{USAGE}\n\njobs:\n{jobs}\n\n"
        "One YAML spec holds the whole run (see jobs/); every key, with its default and meaning:\n"
        f"{config.describe()}"
    )
