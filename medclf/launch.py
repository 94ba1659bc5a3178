"""`python -m medclf.launch ARGS` = `accelerate launch ARGS`, but a preempted job still exits 75.

`accelerate launch` turns any worker's non-zero exit into its own status 1, so a batch script
cannot tell "stopped by a signal after saving a checkpoint" (errors.EXIT_PREEMPTED) from a crash,
nor bad input (errors.EXIT_BAD_INPUT, e.g. a node-local `out`) from a crash.
The Slurm templates start jobs through this module and requeue on 75; everything else about the
launch (arguments, config file, environment) is accelerate's own, but for one setting: CPU runs
get glibc malloc tunables (see `cpu_allocator_env`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import MutableMapping, Optional

import torch
from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from medclf.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED

# glibc hands freed blocks above 128 KiB straight back to the kernel (mmap/munmap) and trims the
# heap top, so every CPU training step faults its activations and gradients in again: thousands
# of munmap calls per step and a large share of the step in the kernel (PLATFORM.md). Keeping
# blocks up to 32 MiB on the heap and never trimming below 4 GiB lets the step reuse them.
# glibc reads this only when a process starts: it must be in the workers' environment.
CPU_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def cpu_allocator_env(args, environ: MutableMapping[str, str]) -> None:
    """Give a CPU run's workers CPU_MALLOC_TUNABLES; a GLIBC_TUNABLES the user set is left as it is."""
    use_cpu = getattr(args, "cpu", False) or environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if (use_cpu or not torch.cuda.is_available()) and "GLIBC_TUNABLES" not in environ:
        environ["GLIBC_TUNABLES"] = CPU_MALLOC_TUNABLES


def main(argv: Optional[list[str]] = None) -> None:
    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    cpu_allocator_env(args, os.environ)  # the workers inherit this process's environment
    try:
        launch_command(args)
    except ChildFailedError as e:
        codes = sorted({failure.exitcode for failure in e.failures.values()})
        print(f"medclf.launch: worker exit status {codes}", file=sys.stderr)
        sys.exit(job_status(codes))
    except subprocess.CalledProcessError as e:
        # One process: accelerate ran it as a plain subprocess.
        sys.exit(e.returncode)


def job_status(codes: list[int]) -> int:
    """The launch's exit status from its failed workers' statuses.

    Once one rank has exited, the agent stops the others with SIGTERM, and those are reported
    killed (negative status). A rank exits 75 only after all ranks agreed to stop and the
    checkpoint is complete, so 75 plus killed ranks is a preemption. Likewise 2 plus killed ranks
    is bad input (a refusal every rank reaches together, such as the multi-node preflight's).
    Any other mix is a failure: 1, as `accelerate launch` reports it.
    """
    for status in (EXIT_PREEMPTED, EXIT_BAD_INPUT):
        if status in codes and all(c == status or c < 0 for c in codes):
            return status
    return 1


if __name__ == "__main__":
    main()
