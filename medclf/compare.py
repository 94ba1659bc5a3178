"""The compare job: the original experiment, out-of-the-box against adapted encoder, with statistics.

    medclf compare jobs/mtsamples.yaml                 # after prepare and mlm (heads optional)

For each encoder in compare.encoders the same head (head.* settings) is trained with
compare.seeds seeds on the cached features and scored on the same validation split. Writes
<out>/comparison.md and <out>/comparison.json: mean ± sd of every metric, a paired bootstrap
95% interval of the weighted-F1 difference (rows resampled, the same rows for both encoders),
McNemar's test on the seed-averaged predictions, and one sentence saying whether adaptation helped.

The seeds can run as a Slurm array, one task per seed (compare.seed_index; slurm/submit_pipeline.sh
with COMPARE_TASKS=N): each task saves its seed's heads' probabilities under <out>/compare/, and the
compare that follows reads them instead of training those heads again (the same numbers: each head
depends only on its seed and the cached features).

The TF-IDF baseline (medclf/baseline.py) is fitted on the same training rows and scored on the
same validation rows: a row of the table (`metrics.baseline` in the JSON), and the verdict says
whether each encoder's head beats it, with the same interval and test against it.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import torch
from scipy import stats
from torch.utils.data import TensorDataset

from medclf import baseline, data, features, jobrecord, layout, manifest, models, report, runtime, storage
from medclf.classifier import Classifier, Head, check_max_length, encoder_reference, fingerprint, load_encoder
from medclf.config import RunSpec, required
from medclf.training import Standardizer, fit, probabilities

log = logging.getLogger(__name__)


def run(spec: RunSpec) -> None:
    cfg, head_cfg, paths = spec.compare, spec.head, layout.Run.of(spec)
    storage.check_writable(paths.comparison_md)
    accelerator = runtime.make_accelerator(paths.out)  # before anything is read under out: all ranks see it
    refs = [encoder_reference(spec, e) for e in cfg.encoders]  # fails early if the adapted model is missing
    record = job_record(spec, refs)
    # A seed task (compare.seed_index: one task of a Slurm array) only saves its seed's heads for the
    # gathering compare: it neither reads nor replaces the comparison and its record.
    task = cfg.seed_index is not None
    if not task and jobrecord.up_to_date(record, spec.overwrite, accelerator):
        return
    wheres = [models.resolve(ref) for ref in refs]  # each folder verified (hashed) once, here
    for ref, where in zip(refs, wheres, strict=True):  # both checked before either is run: a bad second leaves nothing
        check_max_length(head_cfg.max_length, where, ref, "head.max_length")

    # -- data
    classes, train, validation = data.read_splits(paths.out, spec.dataset, head_cfg.train, head_cfg.validation)
    label_sets = report.note_labels(paths.out, validation[1], spec.dataset)

    # -- per seed, both encoders' heads: saved by a seed task, or trained here on the (cached) features
    seeds = [spec.seed + i for i in range(cfg.seeds)]
    if cfg.seed_index is not None:
        seeds = [seeds[cfg.seed_index]]
    heads = seed_heads(spec, accelerator, record, refs, wheres, len(classes), train, validation, seeds)
    if task:
        return
    runs: dict[str, list[dict]] = {}
    probs: dict[str, np.ndarray] = {}
    for keyword in cfg.encoders:
        runs[keyword], probs[keyword] = [], np.zeros((len(validation[2]), len(classes)))
        for seed in seeds:
            p = heads[seed][keyword]
            predicted = p.argmax(1)
            scores = report.metrics(classes, validation[2], predicted, label_sets)
            runs[keyword].append({"seed": seed, "predicted": predicted, **scores})
            probs[keyword] += p / len(seeds)
            log.info("%s seed %d: f1_weighted %.4f", keyword, seed, runs[keyword][-1]["f1_weighted"])

    summary = statistics(spec, dict(zip(cfg.encoders, refs, strict=True)), seeds, runs, probs, validation)
    floor = baseline.fit_predict(train[1][data.TEXT].tolist(), train[2], validation[1][data.TEXT].tolist())
    scores = report.metrics(classes, validation[2], floor, label_sets)
    against_baseline(spec, summary, runs, probs, validation[2], floor, scores)
    if accelerator.is_main_process:
        storage.write_json(paths.comparison_json, summary)
        storage.write_text(paths.comparison_md, comparison_markdown(summary))
        jobrecord.write(record)
        log.info("wrote %s: %s", paths.comparison_md, summary["verdict"])
    accelerator.wait_for_everyone()


def job_record(spec: RunSpec, refs: list[str]) -> jobrecord.Record:
    """What makes the comparison: the recorded keys, the splits and both encoders."""
    paths = layout.Run.of(spec)
    inputs = jobrecord.split_inputs(
        paths.out, [spec.head.train or paths.prepared_train, spec.head.validation or paths.prepared_validation]
    )
    for keyword, ref in zip(spec.compare.encoders, refs, strict=True):
        inputs[f"encoder {keyword}"] = jobrecord.model_fingerprint(ref)
    outputs = [paths.comparison_md, paths.comparison_json]
    return jobrecord.Record(
        "compare", paths.comparison_record, jobrecord.keys("compare", spec), inputs, outputs, outputs
    )


def seed_heads(
    spec: RunSpec,
    accelerator,
    record: jobrecord.Record,
    refs: list,
    wheres: list,
    num_classes: int,
    train,
    validation,
    seeds,
) -> dict[int, dict[str, np.ndarray]]:
    """{seed: {encoder keyword: validation probabilities}} of the heads of each seed: read from the
    file a seed task saved (verified; keyed by everything the heads depend on), else trained here.
    A seed task (compare.seed_index) saves the one it trained; it is up to date when the file is there."""
    cfg, paths = spec.compare, layout.Run.of(spec)
    key = seed_key(record)
    heads: dict[int, dict[str, np.ndarray]] = {}
    for seed in seeds:
        saved = manifest.read_sealed(paths.compare_seed(key, seed), "seed task's heads")
        if saved is not None and set(saved) == set(cfg.encoders):
            heads[seed] = {k: v.numpy() for k, v in saved.items()}
            log.info(
                "compare seed %d: %s (%s)",
                seed,
                "up to date" if cfg.seed_index is not None else "its task's heads read",
                paths.compare_seed(key, seed),
            )
    todo = [seed for seed in seeds if seed not in heads]
    for keyword, ref, where in zip(cfg.encoders, refs, wheres, strict=True):
        if todo:  # features only for an encoder with heads to train
            train_x, validation_x = _features(spec, accelerator, ref, where, num_classes, train, validation)
        for seed in todo:
            p = _train_head(spec, accelerator, seed, num_classes, train_x, train[2], validation_x)
            heads.setdefault(seed, {})[keyword] = p
    if cfg.seed_index is not None and todo and accelerator.is_main_process:
        tensors = {k: torch.from_numpy(np.ascontiguousarray(p)) for k, p in heads[todo[0]].items()}
        storage.write_bytes(paths.compare_seed(key, todo[0]), manifest.sealed(tensors))
        log.info("compare seed %d: wrote %s", todo[0], paths.compare_seed(key, todo[0]))
    accelerator.wait_for_everyone()
    return heads


def seed_key(record: jobrecord.Record) -> str:
    """What one seed's heads depend on: the comparison's keys (but how many seeds, and the bootstrap)
    and its inputs' fingerprints."""
    keys = {k: v for k, v in record.keys.items() if k not in ("compare.seeds", "compare.bootstrap")}
    text = json.dumps({"keys": keys, "inputs": record.inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _features(spec: RunSpec, accelerator, ref: str, where: str, num_classes: int, train, validation):
    """The encoder's (cached) features of the train and validation splits."""
    head_cfg, out = spec.head, required(spec.out, "out")
    encoder, tokenizer, where = load_encoder(ref, where)
    head = Head(encoder.config.hidden_size, num_classes)
    model = Classifier(encoder, head, head_cfg.pooling, frozen=True, window_pooling=head_cfg.window_pooling)
    splits = [train[:2], validation[:2]]
    return features.cached_splits(model, tokenizer, splits, head_cfg, out, accelerator, fingerprint(where))


def _train_head(spec: RunSpec, accelerator, seed: int, num_classes: int, train_x, train_y, validation_x) -> np.ndarray:
    """One head (head.* settings) trained with `seed`; its validation probabilities."""
    head_cfg = spec.head
    runtime.seed_everything(seed)
    scale = Standardizer(train_x, head_cfg.standardize)
    head = fit(
        accelerator,
        Head(train_x.shape[1], num_classes, head_cfg.dropout),
        TensorDataset(scale(train_x), torch.tensor(train_y)),
        epochs=head_cfg.epochs,
        batch_size=head_cfg.batch_size,
        lr=head_cfg.lr,
        seed=seed,
        micro_batch_size=head_cfg.micro_batch_size,
        warmup_ratio=head_cfg.warmup_ratio,  # frozen heads, as the head job trains them
    )
    return probabilities(scale.fold(head), validation_x, accelerator)


def statistics(spec: RunSpec, encoders: dict, seeds: list[int], runs: dict, probs: dict, validation) -> dict:
    """Candidate minus baseline, on the same validation rows: mean ± sd of every metric, the paired
    bootstrap interval of the weighted-F1 difference, McNemar's tests, and the verdict."""
    cfg, head_cfg = spec.compare, spec.head
    validation_url, _, validation_y = validation
    base, cand = cfg.encoders
    num_classes = probs[base].shape[1]
    low, high, observed = paired_bootstrap_f1(
        validation_y,
        [r["predicted"] for r in runs[base]],
        [r["predicted"] for r in runs[cand]],
        num_classes,
        cfg.bootstrap,
        spec.seed,
    )
    ensemble = {k: probs[k].argmax(1) for k in cfg.encoders}
    test = mcnemar(ensemble[base] == validation_y, ensemble[cand] == validation_y)
    per_seed = [
        mcnemar(a["predicted"] == validation_y, b["predicted"] == validation_y)["p_exact"]
        for a, b in zip(runs[base], runs[cand], strict=True)
    ]
    summary = {
        "encoders": encoders,
        "seeds": seeds,
        "settings": {
            "max_length": head_cfg.max_length,
            "stride": head_cfg.stride,
            "windows": head_cfg.windows,
            "window_pooling": head_cfg.window_pooling,
            "epochs": head_cfg.epochs,
            "batch_size": head_cfg.batch_size,
            "lr": head_cfg.lr,
            "pooling": head_cfg.pooling,
            "validation": validation_url,
            "validation_rows": len(validation_y),
        },
        "metrics": {k: {m: summarize([r[m] for r in runs[k]]) for m in report.HEADLINE} for k in cfg.encoders},
        "f1_weighted_difference": {"observed": observed, "ci95": [low, high], "resamples": cfg.bootstrap},
        "mcnemar_seed_averaged": test,
        "mcnemar_per_seed_p_exact": per_seed,
    }
    summary["verdict"] = verdict(base, cand, summary)
    return summary


def against_baseline(spec: RunSpec, summary: dict, runs: dict, probs: dict, y, predicted, scores: dict) -> None:
    """Add the baseline's metrics, each encoder's head against it (paired bootstrap interval of the
    weighted-F1 difference, McNemar on the seed-averaged predictions) and a verdict sentence each."""
    summary["metrics"][baseline.NAME] = {m: summarize([scores[m]]) for m in report.HEADLINE}
    summary["baseline"] = {"model": baseline.DESCRIPTION, "tuned_on_validation": False}
    summary["against_baseline"] = {}
    sentences = []
    for name, per_seed in runs.items():
        low, high, observed = paired_bootstrap_f1(
            y, [predicted], [r["predicted"] for r in per_seed], probs[name].shape[1], spec.compare.bootstrap, spec.seed
        )
        test = mcnemar(predicted == y, probs[name].argmax(1) == y)
        summary["against_baseline"][name] = {
            "f1_weighted_difference": {"observed": observed, "ci95": [low, high], "resamples": spec.compare.bootstrap},
            "mcnemar_seed_averaged": test,
        }
        beats = low > 0 and test["p_exact"] < 0.05
        below = high < 0 and test["p_exact"] < 0.05
        word = "beats" if beats else "is below" if below else "does not clearly beat"
        sentences.append(
            f"{name}'s head {word} the TF-IDF baseline (weighted F1 difference {observed:+.3f}, "
            f"95% CI {low:+.3f} to {high:+.3f}; McNemar p = {test['p_exact']:.3g})"
        )
    summary["verdict"] += " Against the baseline: " + "; ".join(sentences) + "."


def summarize(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "values": a.tolist()}


# ---------------------------------------------------------------- statistics


def weighted_f1(y: np.ndarray, predicted: np.ndarray, weights: np.ndarray, num_classes: int) -> np.ndarray:
    """Support-weighted F1 (sklearn's `average='weighted'`) under row weights [resamples, rows]."""
    weights = np.atleast_2d(weights).astype(float)
    total = np.zeros(weights.shape[0])
    for c in range(num_classes):
        true, pred = y == c, predicted == c
        tp, fp, fn = weights @ (true & pred), weights @ (~true & pred), weights @ (true & ~pred)
        denominator = 2 * tp + fp + fn
        f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        total += (tp + fn) * f1
    return total / weights.sum(1)


def paired_bootstrap_f1(
    y: np.ndarray,
    baseline: list[np.ndarray],
    candidate: list[np.ndarray],
    num_classes: int,
    resamples: int,
    seed: int,
    chunk: int = 1000,
) -> tuple[float, float, float]:
    """95% percentile interval of mean-over-seeds weighted F1, candidate minus baseline.

    Each resample draws validation rows with replacement and scores both encoders (all their
    seeds) on the same draw, so the interval reflects the paired difference, not two noises.
    """
    n = len(y)
    observed = float(
        np.mean([weighted_f1(y, p, np.ones(n), num_classes)[0] for p in candidate])
        - np.mean([weighted_f1(y, p, np.ones(n), num_classes)[0] for p in baseline])
    )
    rng = np.random.default_rng(seed)
    differences = []
    for start in range(0, resamples, chunk):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, resamples - start))
        score = {
            name: np.mean([weighted_f1(y, p, weights, num_classes) for p in preds], axis=0)
            for name, preds in (("b", baseline), ("c", candidate))
        }
        differences.append(score["c"] - score["b"])
    low, high = np.percentile(np.concatenate(differences), [2.5, 97.5])
    return float(low), float(high), observed


def mcnemar(baseline_correct: np.ndarray, candidate_correct: np.ndarray) -> dict:
    """McNemar's test on paired right/wrong: exact two-sided binomial, and chi-square with continuity correction."""
    b = int(np.sum(baseline_correct & ~candidate_correct))  # only the baseline right
    c = int(np.sum(~baseline_correct & candidate_correct))  # only the candidate right
    if b + c == 0:
        return {"baseline_only_correct": b, "candidate_only_correct": c, "p_exact": 1.0, "chi2": 0.0, "p_chi2": 1.0}
    chi2 = (abs(b - c) - 1) ** 2 / (b + c)
    return {
        "baseline_only_correct": b,
        "candidate_only_correct": c,
        "p_exact": float(stats.binomtest(min(b, c), b + c, 0.5).pvalue),
        "chi2": float(chi2),
        "p_chi2": float(stats.chi2.sf(chi2, 1)),
    }


def verdict(base: str, cand: str, summary: dict) -> str:
    """One plain sentence with its evidence."""
    diff = summary["f1_weighted_difference"]
    low, high = diff["ci95"]
    p = summary["mcnemar_seed_averaged"]["p_exact"]
    f1 = summary["metrics"]
    subject = "adaptation" if (base, cand) == ("pretrained", "adapted") else f"{cand} over {base}"
    evidence = (
        f"weighted F1 {f1[cand]['f1_weighted']['mean']:.3f} {cand} vs {f1[base]['f1_weighted']['mean']:.3f} {base} "
        f"(difference {diff['observed']:+.3f}, 95% CI {low:+.3f} to {high:+.3f}); "
        f"McNemar on the seed-averaged predictions p = {p:.3g}"
    )
    if low > 0 and p < 0.05:
        return f"Yes, {subject} helped: {evidence}."
    if low > 0:
        return (
            f"Probably, {subject} helped a little: the F1 interval excludes zero "
            f"but McNemar's test does not confirm it; {evidence}."
        )
    if high < 0 and p < 0.05:
        return f"No, {subject} hurt: {evidence}."
    if high < 0:
        return (
            f"No, and if anything {subject} hurt a little: the F1 interval is below zero "
            f"but McNemar's test does not confirm it; {evidence}."
        )
    return f"No clear evidence that {subject} helped: the F1 interval includes zero; {evidence}."


def comparison_markdown(summary: dict) -> str:
    names = list(summary["encoders"])
    columns = names + [baseline.NAME] * (baseline.NAME in summary["metrics"])
    s = summary["settings"]
    lines = [
        "# Comparison: " + " vs ".join(names),
        "",
        summary["verdict"],
        "",
        f"Heads trained with seeds {summary['seeds']} on cached features; windows of {s['max_length']} tokens "
        f"(stride {s.get('stride') or 'max_length - 2'}, at most {s.get('windows') or 'all'}, "
        f"{s.get('window_pooling', 'mean')} over windows), "
        f"{s['epochs']} epochs, batch {s['batch_size']}, lr {s['lr']}, pooling {s['pooling']}; "
        f"scored on {s['validation_rows']} rows of {s['validation']}.",
        "",
        "| metric | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for m in report.HEADLINE:
        cells = [_cell(summary["metrics"][k][m]) for k in columns]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    diff, test = summary["f1_weighted_difference"], summary["mcnemar_seed_averaged"]
    lines += [
        "",
        "Encoders: " + "; ".join(f"{k} = {v}" for k, v in summary["encoders"].items()),
        "",
        f"- Weighted-F1 difference ({names[1]} − {names[0]}, mean over seeds): {diff['observed']:+.4f}, "
        f"paired bootstrap 95% CI [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}] ({diff['resamples']} resamples).",
        f"- McNemar on seed-averaged predictions: only {names[0]} right {test['baseline_only_correct']}, "
        f"only {names[1]} right {test['candidate_only_correct']}; exact p = {test['p_exact']:.4g}, "
        f"chi-square (continuity-corrected) {test['chi2']:.3f}, p = {test['p_chi2']:.4g}.",
        "- McNemar exact p per seed pair: " + ", ".join(f"{p:.3g}" for p in summary["mcnemar_per_seed_p_exact"]) + ".",
    ]
    lines += _baseline_lines(summary)
    return "\n".join(lines) + "\n"


def _cell(values: dict) -> str:
    """mean ± sd; a single value (the baseline: deterministic, fitted once) as itself."""
    if len(values["values"]) == 1:
        return f"{values['mean']:.4f}"
    return f"{values['mean']:.4f} ± {values['sd']:.4f}"


def _baseline_lines(summary: dict) -> list[str]:
    if "against_baseline" not in summary:
        return []
    lines = ["", f"Baseline: {summary['baseline']['model']}, fitted on the same training rows, not tuned.", ""]
    for name, against in summary["against_baseline"].items():
        diff, test = against["f1_weighted_difference"], against["mcnemar_seed_averaged"]
        lines.append(
            f"- {name} − baseline, weighted F1: {diff['observed']:+.4f}, paired bootstrap 95% CI "
            f"[{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]; McNemar (seed-averaged {name} vs baseline): "
            f"only baseline right {test['baseline_only_correct']}, only {name} right "
            f"{test['candidate_only_correct']}, exact p = {test['p_exact']:.4g}."
        )
    return lines
