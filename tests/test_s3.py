"""S3 for real: moto's server on loopback (tests/s3server.py), with auth on, and faults.

Every test gets a fresh bucket (`s3.url`); `s3.overrides` points a job at the server. The fault
tests freeze the server with SIGSTOP: moto keeps its objects in memory, so a kill would lose them.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from medclf import checkpoint, config, models, prepare, storage
from medclf.config import StorageSpec
from medclf.errors import MedclfError
from tests.helpers import REPO

pytestmark = pytest.mark.s3

MiB = 1 << 20


def configure(s3, **options) -> None:
    storage.configure(StorageSpec(endpoint_url=s3.server.endpoint, **options))


def upload_raw(s3, mtsamples) -> str:
    url = f"{s3.url}/raw/mtsamples.csv"
    storage.write_bytes(url, mtsamples.read_bytes())
    return url


def s3_weights(url: str) -> dict:
    from safetensors.torch import load

    return load(storage.read_bytes(url))


def medclf(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medclf", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


# ---------------------------------------------------------------- prepare, CLI and errors


@pytest.mark.slow
def test_prepare_reads_and_writes_s3(s3, mtsamples, prepared):
    raw = upload_raw(s3, mtsamples)
    prepare.run(config.load("prepare", None, [f"out={s3.url}/run", f"prepare.input={raw}", *s3.overrides]))

    written = ("job.json", "labels.json", "stats.json", "train.csv", "validation.csv")
    assert s3.keys("run/") == [f"run/prepare/{n}" for n in written]
    for name in ("train.csv", "validation.csv", "labels.json"):  # the same bytes as the local run
        assert storage.read_bytes(f"{s3.url}/run/prepare/{name}") == (prepared / "prepare" / name).read_bytes()
    before = {k: storage.read_bytes(f"{s3.url}/{k}") for k in s3.keys("run/")}
    prepare.run(
        config.load("prepare", None, [f"out={s3.url}/run", f"prepare.input={raw}", *s3.overrides])
    )  # up to date
    assert {k: storage.read_bytes(f"{s3.url}/{k}") for k in s3.keys("run/")} == before
    with pytest.raises(MedclfError, match="prepare.split: grouped there, random now; overwrite=true starts prepare"):
        prepare.run(
            config.load(
                "prepare", None, [f"out={s3.url}/run", f"prepare.input={raw}", "prepare.split=random", *s3.overrides]
            )
        )


@pytest.mark.slow
def test_cli_missing_bucket_or_wrong_credentials_is_one_line_and_writes_nothing(s3, mtsamples, tmp_path):
    raw = upload_raw(s3, mtsamples)
    before = s3.keys()
    endpoint = f"--storage.endpoint_url={s3.server.endpoint}"

    missing = medclf("prepare", f"out=s3://no-such-bucket-{s3.bucket}/run", f"prepare.input={raw}", endpoint)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.count("\n") == 1 and "no such bucket" in missing.stderr
    assert "no-such-bucket" not in str(s3.server.client().list_buckets()["Buckets"])

    wrong = "wrong-" + s3.server.secret[::-1]
    with s3.server.auth_required():
        for out in (f"{s3.url}/run", str(tmp_path / "run")):  # reading the input fails first, whatever the output
            denied = medclf(
                "prepare", f"out={out}", f"prepare.input={raw}", endpoint, env={"AWS_SECRET_ACCESS_KEY": wrong}
            )
            assert denied.returncode == 2, denied.stderr
            assert denied.stderr.count("\n") == 1 and "permission denied" in denied.stderr, denied.stderr
            assert s3.server.secret not in denied.stderr + denied.stdout and wrong not in denied.stderr + denied.stdout
    assert s3.keys() == before and not (tmp_path / "run").exists()

    # Right credentials, and the endpoint from the standard environment this time: the four files and
    # the job's record.
    ok = medclf(
        "prepare",
        f"out={s3.url}/run",
        f"prepare.input={raw}",
        "prepare.sample_notes=400",
        env={"AWS_ENDPOINT_URL": s3.server.endpoint},
    )
    assert ok.returncode == 0, ok.stderr
    assert s3.server.secret not in ok.stderr + ok.stdout
    assert len(s3.keys("run/prepare/")) == 5 and s3.keys("run/prepare/")[0] == "run/prepare/job.json"


def test_unreachable_endpoint_fails_in_bounded_time(s3, tmp_path):
    from tests.helpers import free_port

    storage.configure(StorageSpec(endpoint_url=f"http://127.0.0.1:{free_port()}", timeout_s=1, retries=2))
    started = time.monotonic()
    with pytest.raises(MedclfError, match="cannot connect to the storage endpoint"):
        storage.read_bytes(f"{s3.url}/x.csv")
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------- atomic writes and multipart


def test_exception_inside_a_write_leaves_no_object_and_no_upload(s3):
    configure(s3, block_size_mib=5)
    for size in (100, 6 * MiB):  # one PUT at close; a multipart upload begun inside write()
        with pytest.raises(RuntimeError, match="writer died"):
            with storage.atomic_write(f"{s3.url}/partial-{size}.bin") as f:
                f.write(os.urandom(size))
                raise RuntimeError("writer died")
    assert s3.keys() == []
    assert s3.multipart_uploads() == []  # the multipart upload was aborted, not left to linger


def test_large_file_goes_up_in_parts(s3):
    configure(s3, block_size_mib=5)
    data = os.urandom(11 * MiB)
    storage.write_bytes(f"{s3.url}/big.bin", data)
    head = s3.server.client().head_object(Bucket=s3.bucket, Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object: 5 + 5 + 1 MiB
    assert storage.read_bytes(f"{s3.url}/big.bin") == data
    with pytest.raises(MedclfError, match="block_size_mib: S3 parts are at least 5 MiB"):
        configure(s3, block_size_mib=4)


# ---------------------------------------------------------------- listings and fork


def test_listing_sees_writes_of_other_processes(s3):
    client = s3.server.client()
    client.put_object(Bucket=s3.bucket, Key="ckpt/step-000001/manifest.json", Body=b"{}")
    assert storage.listdir(f"{s3.url}/ckpt") == ["step-000001"]
    client.put_object(Bucket=s3.bucket, Key="ckpt/step-000002/manifest.json", Body=b"{}")  # behind our back
    assert storage.listdir(f"{s3.url}/ckpt") == ["step-000001", "step-000002"]
    assert storage.exists(f"{s3.url}/ckpt/step-000002/manifest.json")
    client.delete_object(Bucket=s3.bucket, Key="ckpt/step-000001/manifest.json")
    assert storage.listdir(f"{s3.url}/ckpt") == ["step-000002"]


def test_folder_marker_keys_are_neither_names_nor_files(s3, tmp_path):
    """The S3 console's "Create folder" (and some sync tools) leave a zero-byte key ending in "/"."""
    client = s3.server.client()
    for key in ("run/", "run/prepare/", "run/prepare/empty/", "run/mlm/checkpoints/", "run/blank/"):
        client.put_object(Bucket=s3.bucket, Key=key, Body=b"")
    client.put_object(Bucket=s3.bucket, Key="run/prepare/train.csv", Body=b"a,b\n1,2\n")
    client.put_object(Bucket=s3.bucket, Key="run/mlm/checkpoints/step-0000003/manifest.json", Body=b"{}")

    assert storage.listdir(f"{s3.url}/run/prepare") == ["empty", "train.csv"]  # "empty" is a folder, as locally
    assert storage.listdir(f"{s3.url}/run/prepare/") == ["empty", "train.csv"]
    assert storage.listdir(f"{s3.url}/run/blank") == []
    assert checkpoint.list_steps(f"{s3.url}/run/mlm/checkpoints") == [3]

    local = storage.download_dir(f"{s3.url}/run/prepare", str(tmp_path / "copy"))  # the files, and only them
    assert sorted(str(p.relative_to(local)) for p in pathlib.Path(local).rglob("*")) == ["train.csv"]
    with pytest.raises(MedclfError, match="blank: no such folder, or it is empty"):
        storage.download_dir(f"{s3.url}/run/blank", str(tmp_path / "blank"))


def _read_in_child(url: str, queue) -> None:
    try:
        queue.put(storage.read_bytes(url))
    except BaseException as e:  # noqa: BLE001 - report anything to the parent
        queue.put(repr(e))


def test_forked_worker_gets_its_own_s3_client(s3):
    url = f"{s3.url}/shard.bin"
    storage.write_bytes(url, b"rows")
    parent_fs, _ = storage.filesystem(url)
    assert storage.read_bytes(url) == b"rows"  # the parent's client and event loop are live now
    context = multiprocessing.get_context("fork")  # as DataLoader workers start on Linux
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(url, queue))
    child.start()
    got = queue.get(timeout=30)
    child.join(timeout=30)
    assert got == b"rows"
    assert storage.filesystem(url)[0] is parent_fs  # the parent keeps its own


# ---------------------------------------------------------------- a server that stops answering


@pytest.mark.slow
def test_frozen_server_mid_upload_fails_in_bounded_time_and_leaves_nothing(s3):
    configure(s3, block_size_mib=5, timeout_s=1, retries=2)
    data = os.urandom(12 * MiB)
    started = None
    with pytest.raises(MedclfError, match=r"big\.bin: upload failed: no answer in time") as failure:
        with storage.atomic_write(f"{s3.url}/big.bin") as f:
            f.write(data[: 6 * MiB])  # the multipart upload has begun and part 1 is stored
            s3.server.freeze()
            started = time.monotonic()
            f.write(data[6 * MiB :])  # part 2 meets a server that does not answer
    elapsed = time.monotonic() - started
    s3.server.thaw()
    assert "\n" not in str(failure.value)
    # 2 attempts × 1 s for the part, then the same for the abort: bounded, far from hanging.
    assert elapsed < 10, elapsed
    assert s3.keys() == []

    # After the server resumes, the same write goes through.
    storage.write_bytes(f"{s3.url}/big.bin", data)
    assert storage.read_bytes(f"{s3.url}/big.bin") == data


@pytest.mark.slow
def test_frozen_server_small_write_fails_in_bounded_time(s3):
    configure(s3, timeout_s=1, retries=1)
    with s3.server.frozen():
        started = time.monotonic()
        with pytest.raises(MedclfError, match=r"note\.json: upload failed: no answer in time"):
            storage.write_json(f"{s3.url}/note.json", {"x": 1})
        with pytest.raises(MedclfError, match=r"no answer in time"):
            storage.listdir(s3.url)
        assert time.monotonic() - started < 6
    storage.write_json(f"{s3.url}/note.json", {"x": 2})
    assert storage.read_json(f"{s3.url}/note.json") == {"x": 2}


@pytest.mark.slow
def test_a_brief_stall_is_retried_and_the_write_succeeds(s3):
    configure(s3, timeout_s=1, retries=4)
    storage.write_json(f"{s3.url}/warm.json", {})  # connect first: the stall hits a request, not the connect
    s3.server.freeze()
    threading.Timer(1.5, s3.server.thaw).start()
    started = time.monotonic()
    storage.write_json(f"{s3.url}/state.json", {"step": 6})
    assert 1.0 < time.monotonic() - started < 8  # the first attempt timed out, a later one went through
    assert storage.read_json(f"{s3.url}/state.json") == {"step": 6}


# ---------------------------------------------------------------- model folders on S3


@pytest.mark.slow
def test_model_folder_on_s3_is_fetched_once_and_checked_against_its_manifest(s3, tiny_bert, tmp_path, monkeypatch):
    from medclf import manifest

    monkeypatch.setattr(models, "CACHE", str(tmp_path / "cache"))
    url = f"{s3.url}/models/tiny-bert"
    manifest.publish_dir(str(tiny_bert), url)  # as the mlm job publishes its adapted model
    local = models.resolve(url)
    assert pathlib.Path(local).parent == tmp_path / "cache" / "models"
    assert sorted(os.listdir(tmp_path / "cache" / "models")) == [os.path.basename(local)]  # no temporaries left
    assert models.resolve(url) == local  # unchanged on S3: the cached copy

    # Replaced behind the manifest's back (or read while being republished): refused by name.
    storage.write_text(f"{url}/config.json", (tiny_bert / "config.json").read_text().replace("2", "3", 1))
    with pytest.raises(MedclfError, match=rf"{url}/config\.json: SHA-256 differs from the manifest"):
        models.resolve(url)
    assert sorted(os.listdir(tmp_path / "cache" / "models")) == [os.path.basename(local)]
    with pytest.raises(MedclfError, match="no such model folder, or it is empty"):
        models.resolve(f"{s3.url}/models/absent")


@pytest.mark.slow
def test_a_model_folder_whose_publish_was_killed_is_never_fetched_as_complete(s3, tiny_bert, tmp_path, monkeypatch):
    from medclf import manifest
    from tests.helpers import publish_killed_before_the_manifest

    monkeypatch.setattr(models, "CACHE", str(tmp_path / "cache"))
    url = f"{s3.url}/models/tiny-bert"
    publish_killed_before_the_manifest(tiny_bert, url, s3.server.endpoint)
    assert "models/tiny-bert/model.safetensors" in s3.keys() and "models/tiny-bert/manifest.json" not in s3.keys()
    with pytest.raises(MedclfError, match=rf"{url}: incomplete model \(its publishing was interrupted"):
        models.resolve(url)
    assert not [p for p in (tmp_path / "cache").rglob(".complete")]  # nothing cached as complete
    manifest.publish_dir(str(tiny_bert), url)  # the rerun publishes it whole: now it loads
    assert os.path.isfile(os.path.join(models.resolve(url), "model.safetensors"))


# ---------------------------------------------------------------- the mlm job on S3


@pytest.mark.slow
def test_mlm_on_s3_fails_when_frozen_mid_checkpoint_and_resumes_exactly(
    s3, tiny_bert, mtsamples, tmp_path, monkeypatch, caplog
):
    from medclf import checkpoint, manifest, mlm
    from tests.helpers import TINY_MLM_ARGS, assert_same_weights, make_mlm_run

    # Everything on S3: the model folder, the prepared notes, checkpoints, the adapted model.
    monkeypatch.setattr(models, "CACHE", str(tmp_path / "cache"))
    model_url = f"{s3.url}/models/tiny-bert"
    storage.upload_dir(str(tiny_bert), model_url)
    notes = make_mlm_run(tmp_path / "notes", mtsamples)
    for run in ("whole", "faulty"):
        storage.upload_dir(str(notes / "prepare"), f"{s3.url}/{run}/prepare")

    def args(run: str) -> list[str]:
        return [
            f"out={s3.url}/{run}",
            f"model={model_url}",
            *TINY_MLM_ARGS,
            "max_steps=8",
            "checkpoint_every=3",
            *s3.overrides,
        ]

    # -- the uninterrupted run
    mlm.run(config.load("mlm", None, args("whole")))

    # -- the same run as a CLI job; the server freezes while checkpoint 6 is half-written
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEDCLF_CACHE": str(tmp_path / "cache"), manifest.PAUSE_ENV: "1"}
    command = [sys.executable, "-m", "medclf", "mlm", *args("faulty"), "storage.timeout_s=1", "storage.retries=1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    half_written = f"pausing before the manifest of {s3.url}/faulty/mlm/checkpoints/step-0000006"
    seen, deadline = "", time.monotonic() + 120
    while half_written not in seen and time.monotonic() < deadline and process.poll() is None:
        seen += process.stdout.readline()
    assert half_written in seen, seen[-3000:]
    with s3.server.frozen():
        frozen_at = time.monotonic()
        seen += process.communicate(timeout=60)[0]
        failed_after = time.monotonic() - frozen_at
    assert process.returncode == 2, seen[-3000:]
    assert failed_after < 15  # the 1 s pause, then 1 attempt of at most 1 s at the manifest
    errors = [line.split("medclf mlm: error: ", 1)[1] for line in seen.splitlines() if "medclf mlm: error: " in line]
    assert len(errors) == 1, seen[-3000:]
    assert "step-0000006/manifest.json: upload failed: no answer in time" in errors[0]
    assert s3.server.secret not in seen

    # -- the half-written checkpoint is there, never taken as complete; `latest` never moved to it
    root = f"{s3.url}/faulty/mlm/checkpoints"
    keys = s3.keys("faulty/mlm/checkpoints/step-0000006/")
    assert "faulty/mlm/checkpoints/step-0000006/model.safetensors" in keys
    assert "faulty/mlm/checkpoints/step-0000006/manifest.json" not in keys
    assert storage.read_text(f"{root}/latest").strip() == "step-0000003"
    assert checkpoint.find_latest(root) == checkpoint.step_url(root, 3)

    # -- the server is back: resume=auto continues from step 3 and ends where the whole run ended
    caplog.set_level("INFO")
    mlm.run(config.load("mlm", None, args("faulty")))
    assert f"resumed from {root}/step-0000003 at step 3" in caplog.text
    assert_same_weights(
        s3_weights(f"{s3.url}/whole/mlm/model/model.safetensors"),
        s3_weights(f"{s3.url}/faulty/mlm/model/model.safetensors"),
    )
    assert (
        storage.read_json(f"{s3.url}/faulty/mlm/metrics.json")["history"]
        == storage.read_json(f"{s3.url}/whole/mlm/metrics.json")["history"]
    )
    assert storage.read_text(f"{root}/latest").strip() == "step-0000008"


@pytest.mark.slow
def test_mlm_with_a_missing_bucket_fails_before_any_work(s3, tiny_bert):
    from medclf import mlm

    with pytest.raises(MedclfError, match=r"no such bucket 'no-such-"):
        mlm.run(config.load("mlm", None, [f"out=s3://no-such-{s3.bucket}/run", f"model={tiny_bert}"]))
    assert s3.keys() == []


# ---------------------------------------------------------------- the whole pipeline on S3

PIPELINE = """
out: s3://{bucket}/run
storage:
  endpoint_url: {endpoint}
prepare:
  input: s3://{bucket}/raw/mtsamples.csv
  sample_notes: 160
mlm:
  model: s3://{bucket}/models/tiny-bert
  max_length: 64
  max_steps: 2
  batch_size: 8
  micro_batch_size: 4
  eval_blocks: 4
head:
  encoder: adapted
  max_length: 64
  epochs: 2
evaluate:
  model: adapted
predict:
  model: s3://{bucket}/run/head-adapted/model
  input: s3://{bucket}/run/prepare/validation.csv
  output: s3://{bucket}/predictions.csv
"""


@pytest.mark.slow
def test_tiny_pipeline_with_every_url_on_s3(s3, mtsamples, tiny_bert, tmp_path, monkeypatch):
    import pandas as pd

    from medclf import evaluate, head, mlm, predict

    monkeypatch.setattr(models, "CACHE", str(tmp_path / "cache"))
    upload_raw(s3, mtsamples)
    storage.upload_dir(str(tiny_bert), f"{s3.url}/models/tiny-bert")
    spec_url = f"{s3.url}/jobs/tiny-s3.yaml"  # the spec itself is read from S3, as the CLI would
    storage.write_text(spec_url, PIPELINE.format(bucket=s3.bucket, endpoint=s3.server.endpoint))
    for job in (prepare, mlm, head, evaluate, predict):
        job_name = job.__name__.rsplit(".", 1)[1]
        spec = config.load(job_name, storage.read_text(spec_url), [], source=spec_url)
        storage.configure(spec.storage)
        job.run(spec)

    written = s3.keys("run/")
    for key in (
        "prepare/stats.json",
        "mlm/model/manifest.json",
        "mlm/checkpoints/latest",
        "mlm/metrics.json",
        "head-adapted/model/classifier.json",
        "head-adapted/metrics.json",
        "evaluate/adapted/report.md",
    ):
        assert f"run/{key}" in written, key
    assert any(k.startswith("run/features/") for k in written)  # cached features went to S3 too
    assert not any(k.startswith("run/") and "/." in k for k in written)  # no temporaries left behind
    validation = pd.read_csv(io.BytesIO(storage.read_bytes(f"{s3.url}/run/prepare/validation.csv")))
    predictions = pd.read_csv(io.BytesIO(storage.read_bytes(f"{s3.url}/predictions.csv")))
    assert predictions["text_id"].tolist() == validation["text_id"].tolist()
    classes = storage.read_json(f"{s3.url}/run/prepare/labels.json")["classes"]
    assert set(predictions["predicted_specialty"]) <= set(classes)
    assert s3.multipart_uploads() == []
    for key in (k for k in written if k.endswith((".yaml", ".json"))):  # saved specs and metadata
        assert s3.server.secret not in storage.read_text(f"{s3.url}/{key}"), key
