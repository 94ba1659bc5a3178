"""Typed job specs: one YAML file for a whole run, one dataclass per section, dotted overrides.

Everything is checked before any model or GPU work: an unknown key, a wrong type, a missing
required value or a value out of range is one error line naming the key (all problems at once,
separated by "; "). Each section states its own ranges in `problems()`; `load` asks the sections
the job uses. Checks that need the model, the data or the process count stay in the jobs.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypeGuard, TypeVar, Union

import yaml

from medclf.errors import MedclfError


def opt(default: Any, help: str) -> Any:
    """A spec field with its default and a one-line meaning (shown by `medclf JOB --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(type(default), default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _at_least(section: Any, prefix: str, low: float, *keys: str) -> list[str]:
    """`prefix.key: must be at least low` for each key below `low` (values of a wrong type are
    already reported by the type check)."""
    return [
        f"{prefix}.{key}: must be at least {low}, got {getattr(section, key)}"
        for key in keys
        if _is_number(getattr(section, key)) and getattr(section, key) < low
    ]


def _is_number(value: Any) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# The original experiment kept specialties above 5% of rows and shortened two of the names.
ORIGINAL_SHORT_NAMES = {
    "Consult - History and Phy.": "Consult",
    "Cardiovascular / Pulmonary": "Cardiovascular",
}


@dataclass
class StorageSpec:
    endpoint_url: Optional[str] = opt(None, "S3-compatible endpoint (MinIO, Ceph, ...); else AWS_ENDPOINT_URL")
    profile: Optional[str] = opt(None, "AWS profile name; else AWS_PROFILE or the default chain")
    region: Optional[str] = opt(None, "S3 region; else AWS_DEFAULT_REGION")
    anon: bool = opt(False, "anonymous S3 access (public buckets)")
    timeout_s: float = opt(60.0, "bound on any single storage request, so a stalled server cannot hang a job")
    retries: int = opt(3, "attempts per S3 request before the job fails")
    block_size_mib: int = opt(50, "S3 upload part size (>= 5); a larger file goes up as a multipart upload")

    def problems(self) -> list[str]:
        if _is_number(self.block_size_mib) and self.block_size_mib < 5:
            return [f"storage.block_size_mib: S3 parts are at least 5 MiB, got {self.block_size_mib}"]
        return []


# The columns prepare adds to its splits beside the text and the label: a data column cannot take their names.
PREPARE_COLUMNS = ("text_id", "source_row", "original_specialty")


@dataclass
class DatasetSpec:
    """The columns of the user's CSVs, one setting for the whole run: every job reads them by these names."""

    text_column: str = opt(
        "transcription",
        "column holding a note's text in every CSV the run reads: prepare.input, the prepared splits, "
        "mlm.extra_text, head.train/validation, evaluate.data, predict.input",
    )
    label_column: str = opt(
        "medical_specialty",
        "column holding a note's label (its specialty, department, ...) in every labeled CSV: prepare.input, "
        "the prepared splits, head.train/validation, evaluate.data",
    )

    def problems(self) -> list[str]:
        found = []
        for key in ("text_column", "label_column"):
            name = getattr(self, key)
            if isinstance(name, str) and not name.strip():
                found.append(f"dataset.{key}: must name a column, got {name!r}")
            elif name in PREPARE_COLUMNS:
                found.append(
                    f"dataset.{key}: {name} is a column prepare adds ({', '.join(PREPARE_COLUMNS)}); name another"
                )
        if self.text_column == self.label_column:
            found.append(f"dataset.label_column: must differ from dataset.text_column, both are {self.text_column!r}")
        return found


@dataclass
class PrepareSpec:
    input: Optional[str] = opt(
        None, "URL of the raw CSV: MTSamples or your own (columns dataset.text_column, dataset.label_column; required)"
    )
    split: Literal["grouped", "random"] = opt(
        "grouped", "grouped: all copies of a note on one side, stratified; random: the original row-wise split"
    )
    validation_fraction: float = opt(0.2, "share of rows (random) or notes (grouped) held out for validation")
    min_class_share: float = opt(0.05, "default class rule: keep labels above this share of all rows")
    classes: Optional[dict[str, list[str]]] = opt(
        None, "explicit classes: {class name: [label, ...]}; replaces the min_class_share rule"
    )
    short_names: dict[str, str] = opt(ORIGINAL_SHORT_NAMES, "label -> class name used by the default rule")
    sample_notes: Optional[int] = opt(None, "keep a seeded sample of this many distinct notes (quick runs, CI)")


@dataclass
class MlmSpec:
    model: str = opt("bert-base-uncased", "BERT-family checkpoint: hub id, local folder or fsspec URL of a folder")
    train: Optional[str] = opt(None, "training CSV URL; default <out>/prepare/train.csv")
    validation: Optional[str] = opt(None, "validation CSV for loss/perplexity; default <out>/prepare/validation.csv")
    extra_text: list[str] = opt([], "more unlabeled CSV URLs (column dataset.text_column) to train on")
    max_length: int = opt(512, "tokens per packed block")
    mlm_probability: float = opt(0.15, "share of tokens masked")
    whole_word_masking: bool = opt(False, "mask all pieces of a word together")
    attention_dropout: Optional[float] = opt(
        0.0,
        "dropout on attention probabilities while adapting; null: the checkpoint's own (0.1 in BERT). "
        "0 lets sdpa run its fused kernel (on CPU 2.6x the step at 512 tokens); chosen on a dev fold (README)",
    )
    epochs: int = opt(1, "passes over the training blocks")
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps, at least 1 (overrides epochs)")
    batch_size: int = opt(32, "global batch in blocks per optimizer step, whatever the process count")
    micro_batch_size: int = opt(8, "blocks per process per forward pass; accumulation makes up the rest")
    lr: float = opt(5e-5, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    warmup_ratio: float = opt(0.06, "share of steps spent warming the learning rate up linearly")
    max_grad_norm: float = opt(1.0, "gradient clipping norm; 0 disables")
    eval_every: Optional[int] = opt(None, "evaluate every N steps (always before and after training)")
    eval_seed: int = opt(1234, "seed of the fixed evaluation masks")
    checkpoint_every: int = opt(500, "save a checkpoint every N steps (and at the end)")
    keep_last: int = opt(3, "complete checkpoints kept")
    resume: str = opt(
        "auto",
        "auto: the checkpoint `latest` names once verified, else an older verified one; never: start over; "
        "or a checkpoint URL",
    )
    log_every: int = opt(10, "log loss, lr, tokens/s and ETA every N steps")
    report_to: str = opt("none", "accelerate trackers: none, tensorboard, wandb, ... (comma separated)")
    eval_blocks: Optional[int] = opt(None, "evaluate on the first N validation blocks only (None: all)")
    shard_rows: int = opt(8192, "rows per token-store shard: the unit of tokenizing, of resuming it and of memory")
    loader_workers: int = opt(2, "processes per rank masking batches ahead of training (0: in the training process)")

    def problems(self) -> list[str]:
        found = _at_least(
            self,
            "mlm",
            1,
            "max_length",
            "batch_size",
            "micro_batch_size",
            "checkpoint_every",
            "keep_last",
            "log_every",
            "shard_rows",
        )
        found += _at_least(self, "mlm", 0, "loader_workers")
        if _is_number(self.mlm_probability) and not 0 < self.mlm_probability < 1:
            found.append(f"mlm.mlm_probability: must be between 0 and 1, got {self.mlm_probability}")
        value = self.attention_dropout
        if _is_number(value) and not 0 <= value < 1:
            found.append(f"mlm.attention_dropout: must be at least 0 and below 1 (null: keep the model's), got {value}")
        if _is_number(self.max_steps) and self.max_steps < 1:
            found.append(f"mlm.max_steps: must be at least 1 (null trains for mlm.epochs), got {self.max_steps}")
        return found + _resume_problems("mlm", self.resume)


@dataclass
class HeadSpec:
    encoder: str = opt("pretrained", "pretrained (= mlm.model), adapted (= <out>/mlm/model), or a model URL")
    name: Optional[str] = opt(None, "output folder <out>/head-<name>; default: the encoder keyword")
    train: Optional[str] = opt(None, "training CSV URL; default <out>/prepare/train.csv")
    validation: Optional[str] = opt(None, "validation CSV URL; default <out>/prepare/validation.csv")
    pooling: Literal["cls", "mean"] = opt("cls", "sentence vector: [CLS] of the last layer, or the token mean")
    freeze: bool = opt(True, "frozen encoder (features cached once); false fine-tunes everything")
    max_length: int = opt(512, "tokens per window, [CLS] and [SEP] included")
    stride: Optional[int] = opt(
        None, "content tokens between window starts, 1 .. max_length - 2; null: max_length - 2 (no overlap)"
    )
    windows: Optional[int] = opt(None, "windows per note at most; null: all (the whole note); 1: truncation")
    window_pooling: Literal["mean", "max"] = opt("mean", "a note's vector from its windows' vectors")
    batch_size: int = opt(24, "global training batch (notes per optimizer step), whatever the process count")
    micro_batch_size: Optional[int] = opt(
        None,
        "notes per process per forward pass (divides batch_size; accumulation makes up the rest); "
        "null: batch_size / processes",
    )
    encode_batch_size: int = opt(
        32, "windows per encoder forward pass: encoding, and fine-tuning's chunks (bounds memory on long notes)"
    )
    epochs: int = opt(8, "training epochs")
    lr: float = opt(1e-3, "learning rate (AdamW) of the head; of the encoder too unless encoder_lr is set")
    encoder_lr: Optional[float] = opt(None, "fine-tuning: the encoder's learning rate (about 2e-5); null: head.lr")
    warmup_ratio: Optional[float] = opt(
        None,
        "share of steps warming the lr up linearly, then linear decay to 0; null: 0.1 when fine-tuning, "
        "a constant lr for a frozen head",
    )
    dropout: float = opt(0.2, "dropout between head layers")
    seed: Optional[int] = opt(None, "seed for this head; default the run seed")
    standardize: bool = opt(
        False,
        "frozen heads: train on features scaled to the training split's mean 0 and sd 1 (folded into the "
        "head's first layer afterwards, so the saved head reads raw features)",
    )
    dev_fraction: float = opt(
        0.0,
        "share of training notes held out as a grouped dev fold: the head trains on the rest, is scored "
        "on it each epoch and keeps its best epoch (weighted F1); 0: off, train on all and keep the last",
    )
    checkpoint_every: int = opt(200, "fine-tuning: save a checkpoint every N optimizer steps (and at the end)")
    keep_last: int = opt(
        2, "fine-tuning: complete checkpoints kept (each holds the model, Adam's moments, the best epoch's)"
    )
    resume: str = opt("auto", "fine-tuning: auto, never or a checkpoint URL, as mlm.resume")

    def problems(self) -> list[str]:
        found = _at_least(self, "head", 1, "encode_batch_size", "checkpoint_every", "keep_last")
        found += _resume_problems("head", self.resume)
        if _is_number(self.dev_fraction) and not 0 <= self.dev_fraction < 1:
            found.append(f"head.dev_fraction: must be at least 0 and below 1, got {self.dev_fraction}")
        if self.standardize is True and self.freeze is False:
            found.append("head.standardize: applies to a frozen encoder's features only (head.freeze: true)")
        if isinstance(self.windows, int) and _is_number(self.windows) and self.windows < 1:
            found.append(f"head.windows: must be at least 1 (null: all windows), got {self.windows}")
        content = self.max_length - 2 if _is_number(self.max_length) else None
        stride = self.stride if isinstance(self.stride, int) and _is_number(self.stride) else None
        if stride is not None and content is not None and not 1 <= stride <= max(content, 1):
            found.append(
                f"head.stride: must be between 1 and head.max_length - 2 = {content} "
                f"(null: no overlap), got {self.stride}"
            )
        return found + self._optimizer_problems()

    def _optimizer_problems(self) -> list[str]:
        found = []
        if _is_number(self.warmup_ratio) and not 0 <= self.warmup_ratio < 1:
            found.append(f"head.warmup_ratio: must be at least 0 and below 1, got {self.warmup_ratio}")
        for key in ("lr", "encoder_lr"):
            if _is_number(getattr(self, key)) and getattr(self, key) <= 0:
                found.append(f"head.{key}: must be above 0, got {getattr(self, key)}")
        micro = self.micro_batch_size
        if isinstance(micro, int) and _is_number(micro):
            if micro < 1:
                found.append(f"head.micro_batch_size: must be at least 1 (null: the whole batch), got {micro}")
            elif _is_number(self.batch_size) and self.batch_size % micro:
                found.append(f"head.micro_batch_size: must divide head.batch_size={self.batch_size}, got {micro}")
        return found


@dataclass
class EvaluateSpec:
    model: str = opt("pretrained", "head name (<out>/head-<name>/model) or a classifier URL")
    data: Optional[str] = opt(None, "CSV to evaluate; default <out>/prepare/validation.csv")
    batch_size: int = opt(32, "notes per forward pass")


@dataclass
class CompareSpec:
    encoders: list[str] = opt(["pretrained", "adapted"], "the two encoders compared (as in head.encoder)")
    seeds: int = opt(5, "heads trained per encoder, seeds run seed .. seed+N-1")
    bootstrap: int = opt(10000, "paired bootstrap resamples for the F1 difference interval")
    seed_index: Optional[int] = opt(
        None,
        "a seed task (one of a Slurm array): train only seed `seed + seed_index`'s heads and save them under "
        "<out>/compare/ for the compare that gathers them; null: the whole comparison",
    )

    def problems(self) -> list[str]:
        found = _at_least(self, "compare", 1, "seeds")
        index, seeds = self.seed_index, self.seeds
        if isinstance(index, int) and _is_number(index) and _is_number(seeds) and not 0 <= index < seeds:
            found.append(f"compare.seed_index: must be at least 0 and below compare.seeds={seeds}, got {index}")
        if isinstance(self.encoders, list) and len(self.encoders) != 2:
            found.append(f"compare.encoders: needs exactly two encoders (baseline, candidate), got {self.encoders}")
        return found


@dataclass
class PredictSpec:
    model: Optional[str] = opt(None, "classifier URL (a head's model folder)")
    input: Optional[str] = opt(None, "CSV URL of notes to classify")
    output: Optional[str] = opt(None, "CSV URL to write, rows in input order")
    batch_size: int = opt(64, "notes per forward pass")
    chunk_rows: int = opt(20000, "rows read, classified and written at a time (bounded memory)")

    def problems(self) -> list[str]:
        return _at_least(self, "predict", 1, "chunk_rows", "batch_size")


@dataclass
class RunSpec:
    out: Optional[str] = opt(None, "output URL of the run (local path, file://, s3://, memory://)")
    overwrite: bool = opt(
        False, "start a job over when its outputs were made with other settings or inputs (up-to-date ones stay)"
    )
    seed: int = opt(42, "seed for splits, initialisation, masking and data order")
    storage: StorageSpec = opt(None, "storage options")
    dataset: DatasetSpec = opt(None, "the columns of your CSVs (every job)")
    prepare: PrepareSpec = opt(None, "the prepare job")
    mlm: MlmSpec = opt(None, "the masked-LM domain-adaptation job")
    head: HeadSpec = opt(None, "the classification-head job")
    evaluate: EvaluateSpec = opt(None, "the evaluate job")
    compare: CompareSpec = opt(None, "the compare job")
    predict: PredictSpec = opt(None, "the predict job")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and dataclasses.is_dataclass(_hints(type(self))[f.name]):
                setattr(self, f.name, _hints(type(self))[f.name]())


# Which keys each job cannot do without.
REQUIRED = {
    "prepare": ["out", "prepare.input"],
    "mlm": ["out"],
    "tokenize": ["out"],
    "head": ["out"],
    "evaluate": ["out"],
    "compare": ["out"],
    "predict": ["predict.model", "predict.input", "predict.output"],
    "run": ["out", "prepare.input"],
}


# The sections each job reads (besides the top level and storage): their ranges are checked.
SECTIONS = {"prepare": ["prepare"], "mlm": ["mlm"], "tokenize": ["mlm"], "head": ["head"], "evaluate": ["evaluate"]}
SECTIONS |= {"compare": ["compare", "head"], "predict": ["predict"], "run": ["prepare", "mlm", "head", "compare"]}

T = TypeVar("T")


def required(value: Optional[T], key: str) -> T:
    """The value of a key REQUIRED lists for the job: `load` has refused a spec without it, so a
    None here is a spec built in code that skipped `load`."""
    if value is None:
        raise MedclfError(f"{key}: required but not set")
    return value


def _resume_problems(section: str, resume: Any) -> list[str]:
    if isinstance(resume, str) and resume not in ("auto", "never") and not _looks_like_url(resume):
        return [f"{section}.resume: must be auto, never or a checkpoint URL, got {resume!r}"]
    return []


def _looks_like_url(text: str) -> bool:
    """A folder path or URL, as opposed to a bare word (a mistyped keyword such as `atuo`)."""
    return "/" in text or "\\" in text


def range_problems(job: str, spec: RunSpec) -> list[str]:
    """The range and cross-section problems of the parts of `spec` that `job` uses."""
    found = spec.storage.problems() + spec.dataset.problems()
    for name in SECTIONS.get(job, []):
        section = getattr(spec, name)
        found += section.problems() if hasattr(section, "problems") else []
    if job in ("compare", "run") and spec.head.freeze is not True:
        found.append("head.freeze: compare uses cached features of frozen encoders; set head.freeze=true")
    if job == "run" and spec.compare.seed_index is not None:
        found.append("compare.seed_index: a seed task runs as its own `medclf compare` (a Slurm array task)")
    return found


def check(section: Any) -> None:
    """Raise one MedclfError with every range problem of a section built outside `load`."""
    found = section.problems()
    if found:
        raise MedclfError("; ".join(found))


# ---------------------------------------------------------------- loading and checking


def load(job: str, spec_text: Optional[str], overrides: list[str], source: str = "spec") -> RunSpec:
    """Build the RunSpec for `job` from YAML text and `key=value` overrides, or raise one MedclfError."""
    problems: list[str] = []
    raw: dict = {}
    if spec_text is not None:
        try:
            raw = yaml.safe_load(spec_text) or {}
        except yaml.YAMLError as e:
            raise MedclfError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise MedclfError(f"{source}: must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected key=value")
            continue
        path = resolve_key(job, key)
        target = _type_at(RunSpec, path)
        if target is None:
            problems.append(_unknown(key, ".".join(path)))
            continue
        _set_path(raw, path, _parse_value(value, target))
    spec = _build(RunSpec, raw, "", problems)
    for key in REQUIRED.get(job, []):
        if _get_path(spec, key.split(".")) in (None, ""):
            problems.append(f"{key}: required for {job} but not set")
    problems += range_problems(job, spec)
    if problems:
        raise MedclfError(f"{source}: " + "; ".join(problems))
    return spec


def resolve_key(job: str, key: str) -> list[str]:
    """`mlm.lr` as given; a bare `lr` means the job's own section unless it is a top-level key, a bare
    `text_column` or `label_column` the dataset section (every job reads it); tokenize's section is
    mlm's (it is the masked-LM job's first step)."""
    path = key.split(".")
    top = {f.name for f in dataclasses.fields(RunSpec)}
    if path[0] not in top and len(path) == 1 and path[0] in {f.name for f in dataclasses.fields(DatasetSpec)}:
        return ["dataset"] + path
    own = "mlm" if job == "tokenize" else job
    if path[0] not in top and own in top:
        path = [own] + path
    return path


# Keys that moved: a spec still using the old name is told the new one.
MOVED = {"mlm.text_column": "dataset.text_column", "predict.text_column": "dataset.text_column"}


def _unknown(key: str, resolved: Optional[str] = None) -> str:
    moved = MOVED.get(resolved or key)
    return f"{key}: unknown key" + (f" (now {moved}, for every job)" if moved else "")


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_at(cls, path: list[str]) -> Any:
    tp: Any = cls
    for name in path:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = _hints(tp)
        if name not in hints:
            return None
        tp = hints[name]
    return tp


def _parse_value(text: str, target: Any) -> Any:
    # A string field keeps the text as typed (`name=007` stays "007"); the rest is YAML.
    if target is str or (_is_optional(target) and _non_none(target) is str):
        return None if text in ("null", "~") and target is not str else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(raw: dict, path: list[str], value: Any) -> None:
    for name in path[:-1]:
        nxt = raw.get(name)
        if not isinstance(nxt, dict):
            nxt = raw[name] = {}
        raw = nxt
    raw[path[-1]] = value


def _get_path(obj: Any, path: list[str]) -> Any:
    for name in path:
        obj = getattr(obj, name)
    return obj


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _non_none(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 else Union[tuple(args)]


def _build(cls, raw: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"{where.rstrip('.') or 'spec'}: expected a mapping, got {_show(raw)}")
        return cls()
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            problems.append(_unknown(f"{where}{key}"))
    values = {}
    for name in known & set(raw):
        values[name] = _coerce(raw[name], hints[name], f"{where}{name}", problems)
    return cls(**values)


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; ints pass for floats, nothing else is converted."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".", problems)
    if _is_optional(tp):
        return None if value is None else _coerce(value, _non_none(tp), key, problems)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            problems.append(f"{key}: must be one of {', '.join(map(str, args))}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{key}: expected a list, got {_show(value)}")
            return value
        return [_coerce(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {_show(value)}")
            return value
        return {
            _coerce(k, args[0], f"{key} key", problems): _coerce(v, args[1], f"{key}.{k}", problems)
            for k, v in value.items()
        }
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        return float(value)  # PyYAML reads `2e-5` (no dot) as a string; users mean a number
    if tp in (int, float, str, bool) and (type(value) is not tp):
        problems.append(f"{key}: expected {tp.__name__}, got {_show(value)}")
    return value


_EXPONENT_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"


# ---------------------------------------------------------------- help and saving


def describe(job: Optional[str] = None) -> str:
    """Every key (of one job's section plus the top level, or of all) with its default and meaning."""
    lines = []
    for f in dataclasses.fields(RunSpec):
        tp = _hints(RunSpec)[f.name]
        if dataclasses.is_dataclass(tp):
            if job is None or f.name in (
                *(SECTIONS[job] if job in ("run", "tokenize") else [job]),
                "storage",
                "dataset",
            ):
                lines.append(f"  {f.name}:  ({f.metadata['help']})")
                for g in dataclasses.fields(tp):
                    lines.append(_describe_field(f"{f.name}.{g.name}", g))
        else:
            lines.append(_describe_field(f.name, f))
    return "\n".join(lines)


def _describe_field(key: str, f: dataclasses.Field) -> str:
    default = f.default_factory() if callable(f.default_factory) else f.default
    shown = yaml.safe_dump(default, default_flow_style=True, width=1000).strip()
    shown = shown.removesuffix("\n...").removesuffix("...").strip()
    return f"    {key} = {shown}\n        {f.metadata['help']}"


def to_dict(spec: RunSpec) -> dict:
    return dataclasses.asdict(spec)


def to_yaml(spec: RunSpec) -> str:
    """The resolved spec, saved next to outputs and checkpoints so a run can be reproduced."""
    return yaml.safe_dump(to_dict(spec), sort_keys=False)
