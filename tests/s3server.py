"""S3 for real in tests: moto's standalone server on a free loopback port.

The server runs as its own process (the way s3fs's test suite starts it), so a fault test can
freeze it with SIGSTOP mid-upload and thaw it with SIGCONT; moto keeps objects in memory, so a
kill would lose them. moto accepts any key unless told otherwise: inside `server.auth_required()`
only the IAM user's key is accepted, so a test with wrong credentials fails as on a real store.
(Auth stays off otherwise: moto 5.2 miscomputes the signature of some listings, e.g.
ListObjectsV2 with Prefix=run/prepare/ and Delimiter=/.) Each test gets its own fresh bucket.

    def test_x(s3):            # s3.url = "s3://<fresh bucket>", credentials in the environment
        run(f"out={s3.url}/run", *s3.overrides)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import subprocess
import time
import urllib.request
import uuid
from typing import Iterator

import pytest

from tests.helpers import free_port

REGION = "us-east-1"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@dataclasses.dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    key: str
    secret: str

    def client(self, key: str | None = None, secret: str | None = None):
        """A plain boto3 client: looks at the server without any fsspec cache in between."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=key or self.key,
            aws_secret_access_key=secret or self.secret,
        )

    def freeze(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    @contextlib.contextmanager
    def auth_required(self) -> Iterator[None]:
        """Within the block, a request not signed with the IAM user's key and secret is refused."""
        _post(f"{self.endpoint}/moto-api/reset-auth", b"0")
        try:
            yield
        finally:
            _post(f"{self.endpoint}/moto-api/reset-auth", b"inf")

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        self.freeze()
        try:
            yield
        finally:
            self.thaw()


@dataclasses.dataclass
class S3Bucket:
    server: S3Server
    bucket: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    @property
    def overrides(self) -> list[str]:
        """Spec overrides that point a job at this server (credentials stay in the environment)."""
        return [f"storage.endpoint_url={self.server.endpoint}"]

    def keys(self, prefix: str = "") -> list[str]:
        """Every object under `prefix`, straight from the server."""
        pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def multipart_uploads(self) -> list[str]:
        """Keys of multipart uploads begun and neither completed nor aborted."""
        return [u["Key"] for u in self.server.client().list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])]


def start_server() -> S3Server:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        ["moto_server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"moto_server did not answer on {endpoint}")
            time.sleep(0.05)

    # One IAM user allowed everything, whose key is the one to sign with when auth is required.
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup"
    )
    iam.create_user(UserName="medclf")
    iam.put_user_policy(UserName="medclf", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
    access = iam.create_access_key(UserName="medclf")["AccessKey"]
    return S3Server(endpoint, process, access["AccessKeyId"], access["SecretAccessKey"])


def _post(url: str, body: bytes) -> None:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).close()


def clear_fsspec_cache() -> None:
    """Forget cached filesystem instances (and their listing caches) between tests."""
    import fsspec

    from medclf import storage

    storage.configure(None)
    for cls in list(fsspec.registry.values()) + [fsspec.AbstractFileSystem]:
        clear = getattr(cls, "clear_instance_cache", None)
        if callable(clear):
            clear()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_server()
    yield server
    server.thaw()  # a stopped process ignores SIGTERM until continued
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch) -> Iterator[S3Bucket]:
    """A fresh bucket on the session's server; the environment holds its credentials, storage points at it."""
    from medclf import storage
    from medclf.config import StorageSpec

    for name, value in {
        "AWS_ACCESS_KEY_ID": s3_server.key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    bucket = S3Bucket(s3_server, f"medclf-{uuid.uuid4().hex[:12]}")
    s3_server.client().create_bucket(Bucket=bucket.bucket)
    clear_fsspec_cache()
    storage.configure(StorageSpec(endpoint_url=s3_server.endpoint))
    yield bucket
    s3_server.thaw()
    clear_fsspec_cache()
