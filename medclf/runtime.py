"""The Accelerate plumbing every training loop shares: accelerator, seeding, progress, stop signals.

Jobs call these helpers; none of them hides the loop. See mlm.py and training.py for the loops.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from medclf import preflight

log = logging.getLogger(__name__)

# Test hook: seconds to sleep after every training step (mlm, fine-tuning), so a test can signal
# or kill a run that is mid-training.
STEP_SLEEP_ENV = "MEDCLF_TEST_STEP_SLEEP"


def step_sleep() -> float:
    """The STEP_SLEEP_ENV seconds; 0 (no sleep) unless a test set it."""
    return float(os.environ.get(STEP_SLEEP_ENV, "0") or 0)


def make_accelerator(
    shared: Optional[str] = None, what: str = "out", report_to: str = "none", project_dir: Optional[str] = None
) -> Accelerator:
    """One Accelerator per job. Without CUDA it runs on CPU (gloo when several ranks were launched).

    `shared` is the folder (`what`: its spec key) all the job's processes read and write; every job
    passes one. With several processes it is checked to be one folder they all see before the job
    does any work (medclf/preflight.py), so a node-local `out` fails here, in one line, not at the
    first checkpoint. None (tests, benchmarks): nothing is shared through storage.

    A job that accumulates gradients sets `accelerator.gradient_accumulation_steps` itself, once it
    knows the process count (see mlm.start_accelerator). Mixed precision comes from
    `accelerate launch`/accelerate_config.yaml (bf16 on GPUs).
    """
    # One progress bar per job: transformers' own loading bars and load reports stay quiet (the
    # jobs log what matters, e.g. a masked-LM head that had to be initialised).
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    trackers = [t.strip() for t in report_to.split(",") if t.strip() and t.strip() != "none"]
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        log_with=trackers or None,
        project_dir=project_dir if trackers else None,
    )
    log.info(
        "accelerator: %d process(es), device %s, mixed precision %s",
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
    )
    if shared is not None:
        preflight.check_shared(accelerator, shared, what)
    return accelerator


def seed_everything(seed: int) -> None:
    """The same seed on every rank: identical initialisation on all of them.

    Each rank's share of the data does not come from this seed: mlm splits each global batch by
    rank index, and the head's DataLoader is split across processes by Accelerate's prepare()."""
    set_seed(seed, deterministic=False)


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int, key: str = "batch_size") -> int:
    """Micro-batches per optimizer step so that the global batch does not depend on the process count."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        from medclf.errors import MedclfError

        raise MedclfError(
            f"{key}={global_batch} is not a multiple of micro_batch_size × processes = {micro_batch} × {world_size}"
        )
    return global_batch // per_step


class Progress:
    """One progress bar on the main process, plus a log line of loss, lr, throughput and ETA.

    The line's throughput and ETA are over the steps since the previous line: the steady rate, not
    one diluted by start-up (loading, DataLoader workers starting) or by an evaluation in between."""

    def __init__(self, accelerator: Accelerator, total: int, start: int = 0, desc: str = "train", unit: str = "tokens"):
        self.accelerator = accelerator
        self.total, self.step, self.unit = total, start, unit
        self.bar = tqdm(
            total=total, initial=start, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True
        )
        self.last_rate: Optional[float] = None  # units/s of the last line that had steps
        self._window_started, self._window_steps, self._window_count = time.perf_counter(), 0, 0.0

    def update(self, count: float, **scalars: float) -> None:
        """One optimizer step done, having processed `count` units (tokens, examples) over all ranks."""
        self.step += 1
        self._window_steps += 1
        self._window_count += count
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items()}, refresh=False)

    def log(self, **scalars: float) -> None:
        """The line `step N/M <scalars> <unit>/s R eta HH:MM:SS`; rate and ETA only after steps."""
        now = time.perf_counter()
        shown = " ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        if self._window_steps:
            seconds = max(now - self._window_started, 1e-9)
            self.last_rate = self._window_count / seconds
            eta = time.strftime("%H:%M:%S", time.gmtime(seconds / self._window_steps * (self.total - self.step)))
            shown += f" {self.unit}/s {self.last_rate:.1f} eta {eta}"
        self._window_started, self._window_steps, self._window_count = now, 0, 0.0
        message = f"step {self.step}/{self.total} {shown}"
        if self.accelerator.is_main_process:
            self.bar.write(message) if not self.bar.disable else log.info(message)

    def close(self) -> None:
        self.bar.close()


class StopSignal:
    """Turns SIGTERM/SIGUSR1 (what Slurm sends before a time limit or preemption) into a flag.

    Used as `with StopSignal() as stop:`, which puts the previous handlers back on the way out.
    The loop asks `requested()` at step boundaries; all ranks agree (any rank signalled means
    all stop), so every rank saves the same checkpoint and none is left waiting in a collective.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            log.warning("received %s; stopping at the next step boundary", signal.Signals(signum).name)
        self.received = signum

    def requested(self, accelerator: Accelerator) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
