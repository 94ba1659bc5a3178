"""The spec loader: YAML + dotted overrides, typed, every problem named by its key."""

import pathlib

import pytest

from medclf import config
from medclf.errors import MedclfError

REPO = pathlib.Path(__file__).resolve().parent.parent


def load(yaml_text=None, *overrides, job="mlm", source="spec"):
    return config.load(job, yaml_text, list(overrides), source=source)


def test_defaults_and_yaml_values():
    spec = load("out: /tmp/x\nmlm:\n  lr: 1.0e-4\n  max_steps: 5\n")
    assert spec.out == "/tmp/x"
    assert spec.mlm.lr == 1e-4 and spec.mlm.max_steps == 5
    assert spec.mlm.max_length == 512 and spec.head.batch_size == 24 and spec.head.epochs == 8
    assert spec.prepare.split == "grouped"


def test_overrides_dotted_bare_and_top_level():
    spec = load("out: /tmp/x", "mlm.epochs=3", "lr=2e-5", "seed=7", "prepare.classes={A: [x, y]}")
    assert spec.mlm.epochs == 3
    assert spec.mlm.lr == 2e-5  # a bare key belongs to the job's section
    assert spec.seed == 7
    assert spec.prepare.classes == {"A": ["x", "y"]}


def test_string_override_keeps_text_as_typed():
    spec = load("out: /tmp/x", "head.name=007", job="head")
    assert spec.head.name == "007"


def test_int_is_accepted_for_float():
    assert load("out: o\nmlm: {lr: 1}").mlm.lr == 1.0


@pytest.mark.parametrize(
    "text, overrides, message",
    [
        ("out: o\nmlm: {learning_rate: 1}", [], "mlm.learning_rate: unknown key"),
        ("out: o\nbogus: 1", [], "bogus: unknown key"),
        ("out: o\nmlm: {epochs: three}", [], "mlm.epochs: expected int, got str 'three'"),
        ("out: o\nmlm: {whole_word_masking: 1}", [], "mlm.whole_word_masking: expected bool"),
        ("out: o\nprepare: {split: rows}", [], "prepare.split: must be one of grouped, random"),
        ("out: o\nmlm: [1, 2]", [], "mlm: expected a mapping"),
        ("out: o\nmlm: {extra_text: a.csv}", [], "mlm.extra_text: expected a list"),
        ("out: o", ["mlm.nope=1"], "mlm.nope: unknown key"),
        ("out: o", ["nope"], "expected key=value"),
        (None, [], "out: required for mlm but not set"),
    ],
)
def test_bad_specs_name_the_key(text, overrides, message):
    with pytest.raises(MedclfError) as e:
        load(text, *overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_all_problems_in_one_line():
    with pytest.raises(MedclfError) as e:
        load("mlm: {epochs: x, bogus: 1}")
    text = str(e.value)
    assert "mlm.epochs" in text and "mlm.bogus" in text and "out: required" in text


def test_required_per_job():
    with pytest.raises(MedclfError, match="prepare.input: required for prepare"):
        config.load("prepare", "out: o", [])
    spec = config.load("predict", None, ["model=m", "input=i.csv", "output=o.csv"])
    assert spec.predict.model == "m" and spec.out is None
    with pytest.raises(MedclfError, match="prepare.input: required for run"):
        config.load("run", "out: o", [])
    with pytest.raises(MedclfError, match="head.freeze: compare uses cached features"):
        config.load("run", "out: o\nprepare: {input: x.csv}", ["head.freeze=false"])


def test_invalid_yaml_is_one_line():
    with pytest.raises(MedclfError, match="not valid YAML"):
        load("out: [unclosed", source="x")


@pytest.mark.parametrize("path", sorted((REPO / "jobs").glob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("job", ["prepare", "mlm", "head", "evaluate", "compare", "run"])
def test_every_shipped_spec_validates(path, job):
    config.load(job, path.read_text(), [], source=str(path))


def test_describe_lists_every_key_with_default():
    text = config.describe()
    for key in ("out = null", "mlm.max_length = 512", "head.epochs = 8", "prepare.split = grouped"):
        assert key in text
    assert "mlm.lr" not in config.describe("head")


def test_resolved_spec_round_trips_through_yaml():
    spec = load("out: o\nmlm: {lr: 3.0e-5}")
    assert config.load("mlm", config.to_yaml(spec), []) == spec


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mlm.resume=atuo"], "mlm.resume: must be auto, never or a checkpoint URL, got 'atuo'"),
        (["mlm.max_steps=0"], "mlm.max_steps: must be at least 1"),
        (["mlm.keep_last=0"], "mlm.keep_last: must be at least 1, got 0"),
        (["mlm.mlm_probability=1.5"], "mlm.mlm_probability: must be between 0 and 1, got 1.5"),
        (
            ["mlm.attention_dropout=1"],
            "mlm.attention_dropout: must be at least 0 and below 1 (null: keep the model's), got 1",
        ),
        (["storage.block_size_mib=4"], "storage.block_size_mib: S3 parts are at least 5 MiB, got 4"),
    ],
)
def test_values_out_of_range_are_refused_by_key(overrides, message):
    with pytest.raises(MedclfError) as e:
        load("out: o", *overrides)
    assert message in str(e.value)


def test_resume_accepts_auto_never_and_urls():
    for value in ("auto", "never", "out/mlm/checkpoints/step-0000003", "s3://bucket/run/mlm/checkpoints/step-0000003"):
        assert load("out: o", f"mlm.resume={value}").mlm.resume == value


def test_fine_tuning_checkpoint_keys_are_checked_as_mlms():
    with pytest.raises(MedclfError) as e:
        load("out: o", "head.resume=atuo", "head.checkpoint_every=0", "head.keep_last=0", job="head")
    for message in (
        "head.checkpoint_every: must be at least 1, got 0",
        "head.keep_last: must be at least 1, got 0",
        "head.resume: must be auto, never or a checkpoint URL, got 'atuo'",
    ):
        assert message in str(e.value)
    spec = load("out: o", "head.resume=out/head-ft/checkpoints/step-0000003", job="head")
    assert (spec.head.resume, spec.head.checkpoint_every, spec.head.keep_last) == (
        "out/head-ft/checkpoints/step-0000003",
        200,
        2,
    )


def test_range_problems_are_reported_with_the_type_problems_in_one_line():
    with pytest.raises(MedclfError) as e:
        load("out: o\nmlm: {epochs: x, max_steps: 0, resume: atuo, batch_size: 0}")
    text = str(e.value)
    for key in ("mlm.epochs: expected int", "mlm.max_steps", "mlm.resume", "mlm.batch_size"):
        assert key in text


def test_each_job_checks_the_sections_it_uses():
    with pytest.raises(MedclfError, match="compare.seeds: must be at least 1.*head.freeze: compare uses cached"):
        config.load("compare", "out: o", ["compare.seeds=0", "head.freeze=false"])
    with pytest.raises(MedclfError, match="predict.chunk_rows: must be at least 1, got 0"):
        config.load("predict", None, ["model=m", "input=i.csv", "output=o.csv", "chunk_rows=0"])
    assert config.load("mlm", "out: o", ["compare.seeds=0"]).compare.seeds == 0  # not a section mlm reads


def test_a_job_given_a_spec_built_in_code_without_its_required_keys_names_the_key():
    # load() refuses such a spec; one built in code reaches the job, which narrows the key once.
    from medclf import layout, predict

    with pytest.raises(MedclfError, match=r"^out: required but not set$"):
        layout.Run.of(config.RunSpec())
    with pytest.raises(MedclfError, match=r"^predict\.model: required but not set$"):
        predict.run(config.RunSpec())
    assert layout.Run.of(config.RunSpec(out="memory://run")).out == "memory://run"


def test_standardize_is_for_frozen_heads_only():
    with pytest.raises(MedclfError, match=r"head.standardize: applies to a frozen encoder's features only"):
        config.load("head", None, ["out=/tmp/x", "head.freeze=false", "head.standardize=true"])
    assert config.load("head", None, ["out=/tmp/x", "head.standardize=true"]).head.standardize is True


def test_the_columns_are_one_setting_for_every_job():
    spec = load("out: o\ndataset: {text_column: note_text}", "label_column=department", job="head")
    assert (spec.dataset.text_column, spec.dataset.label_column) == (
        "note_text",
        "department",
    )  # bare: the dataset section
    predict = config.load("predict", None, ["model=m", "input=i.csv", "output=o.csv", "text_column=t"])
    assert predict.dataset.text_column == "t"
    assert "    dataset.label_column = medical_specialty" in config.describe("predict")
    # evaluate's own `data` (the CSV to score) stays a bare key: the section has another name
    assert config.load("evaluate", None, ["out=o", "data=held_out.csv"]).evaluate.data == "held_out.csv"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mlm.text_column=note"], "mlm.text_column: unknown key (now dataset.text_column, for every job)"),
        (["predict.text_column=note"], "predict.text_column: unknown key (now dataset.text_column, for every job)"),
        (
            ["dataset.label_column=transcription"],
            "dataset.label_column: must differ from dataset.text_column, both are",
        ),
        (["dataset.text_column= "], "dataset.text_column: must name a column, got ' '"),
        (["dataset.label_column=text_id"], "dataset.label_column: text_id is a column prepare adds"),
        (["data.columns=x"], "data.columns: unknown key"),
    ],
)
def test_bad_column_settings_are_refused_by_key(overrides, message):
    with pytest.raises(MedclfError) as e:
        load("out: o", *overrides, job="mlm")
    assert message in str(e.value)
