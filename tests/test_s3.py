"""S3 for real: moto's server on loopback (tests/s3server.py), with auth on, and faults.

Every test gets a fresh bucket (`s3.url`); `s3.overrides` points a job at the server. The fault
tests freeze the server with SIGSTOP: moto keeps its objects in memory, so a kill would lose them.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from medclf import config, prepare, storage
from medclf.config import StorageSpec
from medclf.errors import MedclfError

MiB = 1 << 20


def configure(s3, **options) -> None:
    storage.configure(StorageSpec(endpoint_url=s3.server.endpoint, **options))


def upload_raw(s3, mtsamples) -> str:
    url = f"{s3.url}/raw/mtsamples.csv"
    storage.write_bytes(url, mtsamples.read_bytes())
    return url


def medclf(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medclf", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


# ---------------------------------------------------------------- prepare, CLI and errors


def test_prepare_reads_and_writes_s3(s3, mtsamples, prepared):
    raw = upload_raw(s3, mtsamples)
    prepare.run(config.load("prepare", None, [f"out={s3.url}/run", f"prepare.input={raw}", *s3.overrides]))

    assert s3.keys("run/") == [f"run/prepare/{n}" for n in ("labels.json", "stats.json", "train.csv", "validation.csv")]
    for name in ("train.csv", "validation.csv", "labels.json"):  # the same bytes as the local run
        assert storage.read_bytes(f"{s3.url}/run/prepare/{name}") == (prepared / "prepare" / name).read_bytes()
    with pytest.raises(MedclfError, match="output exists; set overwrite=true"):
        prepare.run(config.load("prepare", None, [f"out={s3.url}/run", f"prepare.input={raw}"]))


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

    # The same credentials, right this time: the CLI run writes the four files.
    ok = medclf("prepare", f"out={s3.url}/run", f"prepare.input={raw}", endpoint, "prepare.sample_notes=400")
    assert ok.returncode == 0, ok.stderr
    assert s3.server.secret not in ok.stderr + ok.stdout
    assert len(s3.keys("run/prepare/")) == 4


def test_unreachable_endpoint_fails_in_bounded_time(s3, tmp_path):
    from tests.s3server import free_port

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


def test_frozen_server_mid_upload_fails_in_bounded_time_and_leaves_nothing(s3):
    configure(s3, block_size_mib=5, timeout_s=1, retries=2)
    data = os.urandom(12 * MiB)
    started = None
    with pytest.raises(MedclfError, match=r"big\.bin: upload failed: no answer in time") as failure:
        with storage.atomic_write(f"{s3.url}/big.bin") as f:
            f.write(data[: 6 * MiB])  # the multipart upload has begun and part 1 is stored
            s3.server.freeze()
            started = time.monotonic()
            f.write(data[6 * MiB:])  # part 2 meets a server that does not answer
    elapsed = time.monotonic() - started
    s3.server.thaw()
    assert "\n" not in str(failure.value)
    # 2 attempts × 1 s for the part, then the same for the abort: bounded, far from hanging.
    assert elapsed < 10, elapsed
    assert s3.keys() == []

    # After the server resumes, the same write goes through.
    storage.write_bytes(f"{s3.url}/big.bin", data)
    assert storage.read_bytes(f"{s3.url}/big.bin") == data


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
