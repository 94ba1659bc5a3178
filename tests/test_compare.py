"""The comparison's statistics on inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from medclf import compare


def _paired(b: int, c: int, both: int = 5, neither: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Right/wrong vectors with b rows only the baseline got right and c only the candidate."""
    base = np.array([True] * b + [False] * c + [True] * both + [False] * neither)
    cand = np.array([False] * b + [True] * c + [True] * both + [False] * neither)
    return base, cand


def test_mcnemar_exact_and_chi_square_by_hand():
    test = compare.mcnemar(*_paired(b=10, c=2))
    assert (test["baseline_only_correct"], test["candidate_only_correct"]) == (10, 2)
    # exact: 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert test["p_exact"] == pytest.approx(2 * 79 / 4096)
    # continuity-corrected: (|10 - 2| - 1)^2 / 12 = 49 / 12; chi-square(1) tail at 49/12
    assert test["chi2"] == pytest.approx(49 / 12)
    assert test["p_chi2"] == pytest.approx(0.04331, abs=1e-5)
    assert compare.mcnemar(*_paired(b=0, c=0))["p_exact"] == 1.0
    assert compare.mcnemar(*_paired(b=3, c=3))["p_exact"] == pytest.approx(1.0)


def test_weighted_f1_matches_sklearn_with_and_without_row_weights():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    p[y == 3] = 3  # a class predicted well, so the classes differ
    assert compare.weighted_f1(y, p, np.ones(200), 4)[0] == pytest.approx(f1_score(y, p, average="weighted"))
    counts = rng.integers(0, 3, 200)  # a bootstrap draw is rows repeated: the same as sample weights
    assert compare.weighted_f1(y, p, counts, 4)[0] == pytest.approx(
        f1_score(y, p, average="weighted", sample_weight=counts)
    )


def test_paired_bootstrap_on_known_inputs():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 120)
    noisy = np.where(rng.random(120) < 0.4, (y + 1) % 3, y)

    # identical predictions: the difference is zero in every resample
    assert compare.paired_bootstrap_f1(y, [noisy], [noisy.copy()], 3, 500, seed=0) == (0.0, 0.0, 0.0)
    # always right against always wrong: F1 1 against 0 in every resample
    assert compare.paired_bootstrap_f1(y, [(y + 1) % 3], [y], 3, 500, seed=0) == (1.0, 1.0, 1.0)
    # a real difference: the interval holds the observed value, excludes zero, and is paired
    # (narrower than the spread of two independent scores would allow)
    low, high, observed = compare.paired_bootstrap_f1(y, [noisy], [y], 3, 2000, seed=0)
    assert low < observed < high and low > 0
    assert observed == pytest.approx(1 - f1_score(y, noisy, average="weighted"))
    # seeds are averaged: two candidate seeds, one perfect and one the same as the baseline
    _, _, half = compare.paired_bootstrap_f1(y, [noisy], [y, noisy], 3, 100, seed=0)
    assert half == pytest.approx(observed / 2)


def test_verdict_says_what_the_evidence_says():
    def summary(low, high, p):
        f1 = {"f1_weighted": {"mean": 0.6}}
        return {
            "f1_weighted_difference": {"observed": (low + high) / 2, "ci95": [low, high]},
            "mcnemar_seed_averaged": {"p_exact": p},
            "metrics": {"pretrained": f1, "adapted": f1},
        }

    assert compare.verdict("pretrained", "adapted", summary(0.01, 0.05, 0.01)).startswith("Yes, adaptation helped")
    assert compare.verdict("pretrained", "adapted", summary(-0.02, 0.03, 0.5)).startswith("No clear evidence")
    assert compare.verdict("pretrained", "adapted", summary(-0.05, -0.01, 0.01)).startswith("No, adaptation hurt")
    assert compare.verdict("pretrained", "adapted", summary(-0.05, -0.01, 0.6)).startswith("No, and if anything")
    assert compare.verdict("pretrained", "adapted", summary(0.01, 0.05, 0.6)).startswith("Probably")


# ---------------------------------------------------------------- the TF-IDF baseline in every comparison


@pytest.mark.slow
def test_compare_and_evaluate_carry_the_baseline(tmp_path, prepared, tiny_bert):
    import json

    from medclf import config, evaluate
    from tests.helpers import make_small_run

    run = make_small_run(tmp_path / "run", prepared, train_notes=60, validation_notes=20)
    settings = [f"out={run}", f"mlm.model={tiny_bert}", "head.max_length=32", "head.windows=2", "head.epochs=2"]
    compare.run(config.load("compare", None, [*settings, f"compare.encoders=[pretrained, {tiny_bert}]", "seeds=2"]))
    summary = json.loads((run / "comparison.json").read_text())
    names = list(summary["metrics"])
    assert names[-1] == "baseline" and len(names) == 3
    assert set(summary["metrics"]["baseline"]) == set(summary["metrics"][names[0]])  # the same metric names
    for name in names[:2]:
        against = summary["against_baseline"][name]
        low, high = against["f1_weighted_difference"]["ci95"]
        assert low <= against["f1_weighted_difference"]["observed"] <= high
        assert f"{name}'s head" in summary["verdict"] and "TF-IDF baseline" in summary["verdict"]
    table = (run / "comparison.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| metric |"))
    assert header.startswith("| metric | pretrained | ") and header.endswith("| baseline |")
    assert f"| {summary['metrics']['baseline']['f1_weighted']['mean']:.4f} |" in table
    assert summary["verdict"] in table

    evaluate.run(config.load("evaluate", None, [f"out={run}", "evaluate.model=baseline"]))
    scored = json.loads((run / "evaluate" / "baseline" / "metrics.json").read_text())
    for metric, value in summary["metrics"]["baseline"].items():
        assert scored[metric] == pytest.approx(value["mean"])  # refitted, the same numbers


# ---------------------------------------------------------------- seeds as tasks (a Slurm array)


@pytest.mark.slow
def test_seed_tasks_save_their_heads_and_the_compare_gathers_them_to_the_same_comparison(
    tmp_path, prepared, tiny_bert, monkeypatch
):
    import json

    from medclf import config
    from medclf.errors import MedclfError
    from tests.helpers import make_small_run

    def spec(run, *extra):
        settings = [f"out={run}", f"mlm.model={tiny_bert}", "head.max_length=32", "head.windows=1", "head.epochs=2"]
        settings += [f"compare.encoders=[pretrained, {tiny_bert}]", "seeds=2", "bootstrap=200", *extra]
        return config.load("compare", None, settings)

    whole, tasks = (make_small_run(tmp_path / n, prepared, train_notes=40, validation_notes=12) for n in "ab")
    compare.run(spec(whole))
    for index in (1, 0):  # the tasks of an array, in any order
        compare.run(spec(tasks, f"seed_index={index}"))
    assert not (tasks / "comparison.json").exists() and not (tasks / "comparison.job.json").exists()
    saved = sorted(p.name.split("-seed")[1] for p in (tasks / "compare").glob("*-seed*.safetensors"))
    assert saved == ["42.safetensors", "43.safetensors"]
    with pytest.raises(MedclfError, match=r"compare.seed_index: must be at least 0 and below compare.seeds=2, got 2"):
        spec(tasks, "seed_index=2")

    # The gathering compare trains no head: every seed's heads come from its task's file.
    monkeypatch.setattr(compare, "_train_head", lambda *a, **k: pytest.fail("a head its task had saved was trained"))
    compare.run(spec(tasks))
    compare.run(spec(tasks, "seed_index=0"))  # a task run again: up to date
    summaries = [json.loads((run / "comparison.json").read_text()) for run in (whole, tasks)]
    for summary in summaries:
        summary["settings"].pop("validation")  # the run folder's path
    assert summaries[0] == summaries[1]
