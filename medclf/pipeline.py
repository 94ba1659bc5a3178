"""The run job: the whole experiment in one command, each stage skipped when it is up to date.

    medclf run jobs/quickstart.yaml
    accelerate launch -m medclf run jobs/mtsamples.yaml          # every stage on all processes

prepare -> mlm -> head (one per compare.encoders: pretrained, adapted) -> compare, all on the
same spec and run folder. Each stage is the job itself (its own run(spec)), so each writes its
record (medclf/jobrecord.py) and a stage whose outputs were made with the same settings logs
"up to date" and does nothing; `overwrite=true` starts over only the stages whose settings or
inputs changed. An interrupted mlm resumes from its checkpoint. SIGTERM/SIGUSR1 stops mlm at the
next step (with a checkpoint) and any other stage once it ends: exit 75, and the next run goes on
from there. Ends by printing the verdict and where comparison.md is.
"""

from __future__ import annotations

import dataclasses
import logging
import types

from accelerate.utils import broadcast_object_list

from medclf import compare, head, layout, mlm, prepare, runtime, storage
from medclf.config import RunSpec
from medclf.errors import MedclfError, Preempted

log = logging.getLogger(__name__)


def run(spec: RunSpec) -> None:
    accelerator = runtime.make_accelerator(layout.Run.of(spec).out)  # one process group for every stage's barriers
    with runtime.StopSignal() as stop:
        for name, job, stage_spec in stages(spec):
            log.info("run: %s", name)
            if job is prepare:
                _on_main_process(accelerator, job.run, stage_spec)  # prepare has no process group of its own
            else:
                job.run(stage_spec)
            if stop.requested(accelerator):
                raise Preempted(f"stopped after {name}; `medclf run` again goes on from there")
    if accelerator.is_main_process:
        print(storage.read_json(layout.Run.of(spec).comparison_json)["verdict"])
        print(layout.Run.of(spec).comparison_md)


def stages(spec: RunSpec) -> list[tuple[str, types.ModuleType, RunSpec]]:
    """(name, the job's module, its spec): prepare, mlm, a head per compared encoder (in its own
    folder head-<encoder>, whatever head.name says), compare."""
    heads = [
        (f"head {e}", head, dataclasses.replace(spec, head=dataclasses.replace(spec.head, encoder=e, name=None)))
        for e in spec.compare.encoders
    ]
    return [("prepare", prepare, spec), ("mlm", mlm, spec), *heads, ("compare", compare, spec)]


def _on_main_process(accelerator, job, spec: RunSpec) -> None:
    """Run `job` on the main process; the others wait and fail with the same line if it fails."""
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            job(spec)
        except MedclfError as e:
            outcome = [str(e)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome)
    if outcome[0] is not None:
        raise MedclfError(outcome[0])
