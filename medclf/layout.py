"""The layout of a run folder, named once: every job finds its inputs and outputs here.

<out>/prepare/{train,validation,all}.csv, labels.json, stats.json   the prepare job
<out>/cache/                        tokenized text (masked-LM job)
<out>/mlm/checkpoints/step-NNNNNNN/ resumable training state
<out>/mlm/model/                    the adapted encoder (manifest last)
<out>/mlm/metrics.json, trackers/   its metrics and tracker logs
<out>/features/                     cached encoder features (head, evaluate, compare)
<out>/head-<name>/                  a head: model/, metrics.json, report.md, confusion.png, spec.yaml;
                                    fine-tuning's checkpoints/step-NNNNNNN/ too
<out>/evaluate/<name>/              an evaluate job's report
<out>/comparison.{md,json}          the compare job; compare/ the heads its seed tasks (a Slurm array) saved
<folder>/job.json                   what made a job's outputs, written last (medclf/jobrecord.py):
                                    prepare/, mlm/, head-<name>/, evaluate/<name>/; compare's is
                                    <out>/comparison.job.json, predict's <output>.job.json
"""

from __future__ import annotations

from dataclasses import dataclass

from medclf import storage
from medclf.config import RunSpec, required

RECORD = "job.json"


def predictions_record(output: str) -> str:
    """The predict job's record, beside the CSV it wrote."""
    return f"{output}.job.json"


@dataclass(frozen=True)
class Run:
    """The URLs of one run folder `out`."""

    out: str

    @classmethod
    def of(cls, spec: RunSpec) -> Run:
        """The run folder of a job that REQUIRES `out` (config.load has refused a spec without it)."""
        return cls(required(spec.out, "out"))

    def _at(self, *parts: str) -> str:
        return storage.join(self.out, *parts)

    @property
    def prepare(self) -> str:
        return self._at("prepare")

    @property
    def prepared_train(self) -> str:
        return self._at("prepare", "train.csv")

    @property
    def prepared_validation(self) -> str:
        return self._at("prepare", "validation.csv")

    @property
    def labels(self) -> str:
        return self._at("prepare", "labels.json")

    @property
    def prepared_stats(self) -> str:
        return self._at("prepare", "stats.json")

    @property
    def prepare_record(self) -> str:
        return self._at("prepare", RECORD)

    @property
    def cache(self) -> str:
        return self._at("cache")

    @property
    def mlm(self) -> str:
        return self._at("mlm")

    @property
    def mlm_checkpoints(self) -> str:
        return self._at("mlm", "checkpoints")

    @property
    def mlm_model(self) -> str:
        return self._at("mlm", "model")

    @property
    def mlm_metrics(self) -> str:
        return self._at("mlm", "metrics.json")

    @property
    def mlm_trackers(self) -> str:
        return self._at("mlm", "trackers")

    @property
    def mlm_record(self) -> str:
        return self._at("mlm", RECORD)

    @property
    def features(self) -> str:
        return self._at("features")

    def head(self, name: str) -> str:
        return self._at(f"head-{name}")

    def head_model(self, name: str) -> str:
        return self._at(f"head-{name}", "model")

    def head_checkpoints(self, name: str) -> str:
        return self._at(f"head-{name}", "checkpoints")

    def head_record(self, name: str) -> str:
        return self._at(f"head-{name}", RECORD)

    def evaluation(self, name: str) -> str:
        return self._at("evaluate", name)

    def evaluation_record(self, name: str) -> str:
        return self._at("evaluate", name, RECORD)

    @property
    def comparison_md(self) -> str:
        return self._at("comparison.md")

    @property
    def comparison_json(self) -> str:
        return self._at("comparison.json")

    def compare_seed(self, key: str, seed: int) -> str:
        """One compare seed task's heads, keyed by what they depend on (compare.seed_key)."""
        return self._at("compare", f"{key}-seed{seed}.safetensors")

    @property
    def comparison_record(self) -> str:
        return self._at("comparison.job.json")
