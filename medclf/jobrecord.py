"""What made a job's outputs: the record that makes every job idempotent.

    <job's output folder>/job.json   {"job", "keys": {spec key: value}, "inputs": {input: fingerprint}}

A job writes its record LAST, once every output is complete. On start it compares the record
with what it is asked to do now:
- the same keys and inputs: it logs "<job>: up to date (<where>)" and does nothing (exit 0);
- something differs: one error line naming each difference with both values (exit 2), unless
  `overwrite=true`, which discards the job's outputs (checkpoints included) and starts it over;
- outputs but no record (an interrupted or older run): refused unless `overwrite=true`. The one
  exception is checkpoints without a model (mlm's, or a head folder holding only fine-tuning's):
  an interrupted training, which resume=auto continues.

Only the keys that shape a job's outputs are recorded (KEYS, one list per job); keys that change
speed, logging or storage but give the same result are not. Inputs are fingerprinted by content:
files by the SHA-256 of their bytes, models as medclf.models names them (manifest hashes, the
packaged weights' hash, or a hub id's name), so a changed upstream output re-runs its dependants.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Optional

from medclf import __version__, classifier, config, layout, manifest, models, storage
from medclf.config import RunSpec
from medclf.errors import MedclfError

log = logging.getLogger(__name__)

# The spec keys that shape each job's outputs. Left out on purpose, because the result is the same
# whatever their value: logging and tracking (log_every, report_to), checkpointing and resuming
# (checkpoint_every, keep_last, resume, eval_every; compare.seed_index, which splits the same
# comparison into tasks), batch sizes that only change speed
# (mlm.micro_batch_size: accumulation keeps the global batch; head.encode_batch_size,
# evaluate.batch_size, predict.batch_size, predict.chunk_rows: inference only), storage options,
# `out` and `overwrite`, and the locations of inputs (their content is fingerprinted instead).
# A head's features and training: the head job and the compare job both shape their outputs with them.
HEAD_SETTINGS = [
    "head.pooling",
    "head.max_length",
    "head.stride",
    "head.windows",
    "head.window_pooling",
    "head.batch_size",
    "head.epochs",
    "head.lr",
    "head.warmup_ratio",
    "head.standardize",
    "head.dropout",
]
# The columns a job reads its notes and labels from: a file may hold several, so the name matters
# beside the file's fingerprint (and prepare writes its splits under these names).
COLUMNS = ["dataset.text_column", "dataset.label_column"]
KEYS = {
    # the columns, the class rule, the sample and the split (seeded)
    "prepare": [
        *COLUMNS,
        "seed",
        "prepare.split",
        "prepare.validation_fraction",
        "prepare.min_class_share",
        "prepare.classes",
        "prepare.short_names",
        "prepare.sample_notes",
    ],
    # the training trajectory (mlm.batch_size is the global batch) and the metrics it reports
    "mlm": [
        "seed",
        "dataset.text_column",
        "mlm.max_length",
        "mlm.mlm_probability",
        "mlm.whole_word_masking",
        "mlm.attention_dropout",
        "mlm.epochs",
        "mlm.max_steps",
        "mlm.batch_size",
        "mlm.lr",
        "mlm.weight_decay",
        "mlm.warmup_ratio",
        "mlm.max_grad_norm",
        "mlm.eval_seed",
        "mlm.eval_blocks",
    ],
    # the classifier: features (pooling, windows, frozen or not) and the head's training (dev fold included)
    "head": [*COLUMNS, "seed", "head.seed", "head.freeze", *HEAD_SETTINGS, "head.encoder_lr", "head.dev_fraction"],
    # the heads compare trains (head.* settings but head.seed and the dev fold, which compare does not use)
    "compare": [*COLUMNS, "seed", "compare.encoders", "compare.seeds", "compare.bootstrap", *HEAD_SETTINGS],
    # evaluate and predict only apply a saved classifier to the columns read: its inputs decide the rest
    "evaluate": [*COLUMNS],
    "predict": ["dataset.text_column"],
}
# Keys that moved since a record was written: the old key's value, where a record holds it, stands
# for the new one (before dataset.*, mlm and predict each had their own text_column).
MOVED = {"dataset.text_column": ["mlm.text_column", "predict.text_column"]}
# Keys added later whose default is not what records without them were made with: the value they had.
BEFORE_ADDED = {"mlm.attention_dropout": None}  # before it: the checkpoint's own attention dropout


def keys(job: str, spec: RunSpec) -> dict[str, Any]:
    """{key: value} of the keys that shape `job`'s outputs."""
    values = {}
    for key in KEYS[job]:
        value: Any = spec
        for name in key.split("."):
            value = getattr(value, name)
        values[key] = value
    return values


# ---------------------------------------------------------------- fingerprints of inputs


def file_fingerprint(url: str) -> str:
    """SHA-256 of a file's bytes (read in blocks: an input may be large)."""
    digest = hashlib.sha256()
    with storage.open_read(url) as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(ref: str) -> str:
    """A model's content, as cheaply as it is known: the packaged weights' expected hash (checked when
    loaded), a medclf folder's manifest hashes, another folder's files, or a hub id's name."""
    name = storage.local_path(ref) if storage.is_local(ref) else None
    if name in models.PACKAGED and not os.path.isdir(name):
        models.packaged(name)  # installed, and its weights match
        return "package:" + models.PACKAGED[name][2]
    return classifier.fingerprint(models.resolve(ref))


def folder_fingerprint(url: str, what: str) -> str:
    """A medclf folder (classifier, model) by the hashes its manifest lists."""
    return manifest.fingerprint(manifest.read(url, what))


def split_inputs(out: str, urls: list[str]) -> dict[str, str]:
    """The labeled data a head, compare or evaluate reads: `urls`, and the run's classes and prepared
    splits where they exist (every note's labels come from them too)."""
    paths = layout.Run(out)
    extra = [paths.labels, paths.prepared_train, paths.prepared_validation]
    urls = list(dict.fromkeys([*urls, *(u for u in extra if u not in urls and storage.exists(u))]))
    return {shown(out, u): file_fingerprint(u) for u in urls}


def shown(out: Optional[str], url: str) -> str:
    """An input's name in a record: relative to the run folder when inside it."""
    prefix = (out or "").rstrip("/") + "/"
    return url[len(prefix) :] if out and url.startswith(prefix) else url


# ---------------------------------------------------------------- checking and writing


@dataclasses.dataclass
class Record:
    """One job's record: where it lives, what it holds now, and the outputs it vouches for."""

    job: str
    url: str
    keys: dict[str, Any]
    inputs: dict[str, str]
    outputs: list[str]  # removed by overwrite=true (the record itself first)
    made: list[str] = dataclasses.field(default_factory=list)  # outputs that, without a record, are refused

    def content(self) -> dict:
        return {"job": self.job, "medclf": __version__, "keys": self.keys, "inputs": self.inputs}


def up_to_date(record: Record, overwrite: bool, accelerator: Any = None) -> bool:
    """True when the job's outputs were made with these keys and inputs (logged; the job does nothing).

    Otherwise returns False with the way cleared for a fresh run, or raises: differing settings, or
    outputs without a record, are refused unless `overwrite`, which discards them (main process, then
    every process waits, so none reads a folder being removed)."""
    there = _read(record.url)
    if there is not None:
        changed = differences(there, record)
        if not changed:
            changed = [f"{u}: missing" for u in record.made if not storage.exists(u)]  # removed by hand
        if not changed:
            log.info("%s: up to date (%s)", record.job, record.url)
            return True
        if not overwrite:
            raise MedclfError(f"{record.url}: " + "; ".join(changed) + f"; overwrite=true starts {record.job} over")
    else:
        found = [u for u in record.made if storage.exists(u) and not _empty_folder(u)]
        if not found:
            return False
        if not overwrite:
            raise MedclfError(
                f"{found[0]}: output exists without {os.path.basename(record.url)} (an interrupted or older run); "
                f"overwrite=true starts {record.job} over"
            )
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every process has read the record before any of it goes
    if accelerator is None or accelerator.is_main_process:
        log.info("%s: overwrite=true: removing %s", record.job, ", ".join([record.url, *record.outputs]))
        for url in [record.url, *record.outputs]:
            storage.remove(url)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return False


def write(record: Record) -> None:
    """The record, written last and atomically (main process): the job's outputs are complete."""
    storage.write_json(record.url, record.content())


def differences(there: dict, record: Record) -> list[str]:
    """`key: old there, new now` for each recorded key that differs, `input NAME: changed` for each input."""
    found = []
    old_keys: dict = _mapping(there, "keys")
    for key, value in record.keys.items():
        old = old_keys[key] if key in old_keys else _earlier(old_keys, key)
        if _canonical(old) != _canonical(value):
            found.append(f"{key}: {_show(old)} there, {_show(value)} now")
    old_inputs: dict = _mapping(there, "inputs")
    for name in list(dict.fromkeys([*old_inputs, *record.inputs])):
        if old_inputs.get(name) != record.inputs.get(name):
            found.append(f"input {name}: " + _input_change(old_inputs.get(name), record.inputs.get(name)))
    return found


def _mapping(record: dict, name: str) -> dict:
    value = record.get(name)
    return value if isinstance(value, dict) else {}


def _input_change(old: Optional[str], new: Optional[str]) -> str:
    if old is None:
        return "new"
    return "no longer read" if new is None else "changed"


def _read(url: str) -> Optional[dict]:
    if not storage.exists(url):
        return None
    try:
        raw = storage.read_json(url)
    except MedclfError:
        raw = None
    if not isinstance(raw, dict):
        raise MedclfError(f"{url}: not a job record; overwrite=true starts the job over")
    return raw


def _earlier(old_keys: dict, key: str) -> Any:
    """A key the record does not hold: the value of the key it moved from, else (a key added later) the
    value runs had before it was added: its default, or BEFORE_ADDED's."""
    moved = [old_keys[k] for k in MOVED.get(key, []) if k in old_keys]
    if moved:
        return moved[0]
    return BEFORE_ADDED[key] if key in BEFORE_ADDED else _default(key)


def _default(key: str) -> Any:
    section, _, name = key.rpartition(".")
    cls = config.RunSpec if not section else type(getattr(config.RunSpec(), section))
    return getattr(cls(), name)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _empty_folder(url: str) -> bool:
    path = storage.local_path(url)
    return storage.is_local(url) and os.path.isdir(path) and not os.listdir(path)
