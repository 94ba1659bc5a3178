"""Every read and write of medclf goes through here, by fsspec URL.

Local paths, file://, s3:// and memory:// behave the same to job code. Writes are atomic: a
local file is written under a temporary name and renamed; a remote object is uploaded in one
piece (a multipart upload completes as one object) and discarded if the writer fails, so a
reader never sees a half-written file as complete. Storage options (endpoint, profile, region,
anonymous, timeouts) come from the spec's `storage` section or the standard environment; they are
never printed or logged.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import lzma
import os
import shutil
import tempfile
import time
import uuid
from typing import IO, Any, Iterator, Optional, cast

import fsspec
from fsspec.core import url_to_fs

from medclf.errors import MedclfError

log = logging.getLogger(__name__)

_s3_options: Optional[dict[str, Any]] = None  # set by configure(); the StorageSpec defaults until then


def configure(storage_spec: Any) -> None:
    """Set the S3 options for this process from a StorageSpec (None: its defaults).

    Credentials stay in the environment or the AWS profile; nothing here is printed or logged.
    """
    global _s3_options
    from medclf import config

    if storage_spec is None:
        storage_spec = config.StorageSpec()
    config.check(storage_spec)  # a spec built in code, not by config.load, is checked here too
    client_kwargs: dict[str, Any] = {}
    if storage_spec.endpoint_url:
        client_kwargs["endpoint_url"] = storage_spec.endpoint_url
    if storage_spec.region:
        client_kwargs["region_name"] = storage_spec.region
    options: dict[str, Any] = {
        "anon": storage_spec.anon,
        # A listing may have been changed by another process or rank since: never cache one.
        "use_listings_cache": False,
        # Parts of exactly one block: a 400 MB write() is 8 requests, each bounded by timeout_s, not one.
        "default_block_size": storage_spec.block_size_mib << 20,
        "fixed_upload_size": True,
        # Bounded waits: per-socket timeouts, plus a total limit on each request (see _bounded_session).
        "config_kwargs": {
            "connect_timeout": storage_spec.timeout_s,
            "read_timeout": storage_spec.timeout_s,
            "retries": {"total_max_attempts": storage_spec.retries, "mode": "standard"},
            "http_session_cls": _bounded_session(),
        },
    }
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    if storage_spec.profile:
        options["profile"] = storage_spec.profile
    _s3_options = options


@functools.cache
def _bounded_session() -> type:
    """aiobotocore's HTTP session with a total time limit on every request.

    botocore's read timeout only bounds each wait for bytes. An upload to a server that stopped
    answering can wait far longer (for `100 Continue` before each part's body), so each request,
    a whole part upload included, gets at most `timeout_s` in all.
    """
    import aiohttp
    from aiobotocore.httpsession import AIOHTTPSession

    def bounded(timeout: aiohttp.ClientTimeout) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=timeout.sock_read, sock_connect=timeout.sock_connect, sock_read=timeout.sock_read
        )

    class BoundedSession(AIOHTTPSession):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._timeout: aiohttp.ClientTimeout = bounded(self._timeout)

        def _get_request_timeout(self, request: Any) -> Any:
            timeout = super()._get_request_timeout(request)
            return None if timeout is None else bounded(timeout)

    return BoundedSession


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path of a URL, with this process's storage options.

    Asked for afresh on every call and never kept: fsspec caches instances per process id, so a
    forked DataLoader worker gets its own S3 client instead of the parent's event loop.
    """
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in ("s3", "s3a"):
        return url_to_fs(url)
    if _s3_options is None:
        configure(None)
    fs, path = url_to_fs(url, **cast(dict[str, Any], _s3_options))  # set by configure()
    # botocore already tries each request `retries` times; s3fs's own retry loop would multiply that.
    fs.retries = 1
    return fs, path


def join(url: str, *parts: str) -> str:
    base = url.rstrip("/")
    base += "/" if base.endswith(":") else ""  # a scheme's root (memory://) keeps its "//"
    return "/".join([base] + [p.strip("/") for p in parts if p])


def parent(url: str) -> str:
    """The folder a file's URL is in: s3://b/x/y.csv -> s3://b/x, y.csv -> . (the working folder)."""
    scheme, sep, path = url.partition("://") if "://" in url else ("", "", url)
    folder = path.rstrip("/").rpartition("/")[0] or ("/" if path.startswith("/") else "" if sep else ".")
    return f"{scheme}{sep}{folder}"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


# ---------------------------------------------------------------- reading


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    with reported(url):
        _fresh(fs, path)
        return fs.exists(path)


def listdir(url: str) -> list[str]:
    """Names directly under `url`, never from a stale listing cache; [] when it does not exist."""
    fs, path = filesystem(url)
    with reported(url):
        _fresh(fs, path)
        try:
            entries = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    # The listed folder's own marker key ("<path>/", a zero-byte object the S3 console and some
    # tools create) comes back among its entries: it is not a name under it.
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/"))


def _fresh(fs: fsspec.AbstractFileSystem, path: str) -> None:
    # s3fs caches listings per instance; another process (or rank) may have written since.
    fs.invalidate_cache(path)
    fs.invalidate_cache(path.rstrip("/").rsplit("/", 1)[0])


@contextlib.contextmanager
def open_read(url: str, mode: str = "rb", **kwargs: Any) -> Iterator[IO]:
    """Open a URL for reading; a missing file or bucket, or no permission, is one MedclfError line."""
    fs, path = filesystem(url)
    try:
        f = fs.open(path, mode, **kwargs)
    except Exception as e:  # noqa: BLE001 - every backend raises its own kinds
        raise MedclfError(f"{url}: {describe_error(e)}") from None
    with f:
        yield f


def read_bytes(url: str, decompress: bool = False) -> bytes:
    """The file's bytes; with `decompress`, a `.xz`, `.gz`, `.bz2` or `.zst` file is decompressed by its suffix."""
    kwargs = {"compression": "infer"} if decompress else {}
    with open_read(url, **kwargs) as f:
        try:
            return f.read()
        except (lzma.LZMAError, OSError, EOFError) as e:  # a corrupt or truncated stream (gzip raises OSError)
            raise MedclfError(f"{url}: cannot decompress ({describe_error(e)})") from None


def read_text(url: str) -> str:
    data = read_bytes(url)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MedclfError(f"{url}: not UTF-8 text (bad byte at offset {e.start})") from None


def read_json(url: str) -> Any:
    try:
        return json.loads(read_text(url))
    except json.JSONDecodeError as e:
        raise MedclfError(f"{url}: not valid JSON ({e.msg} at line {e.lineno})") from None


def describe_error(e: BaseException) -> str:
    """A short reason for a storage failure, with no credentials in it."""
    if isinstance(e, FileNotFoundError):
        return "no such file, folder or bucket"
    if isinstance(e, PermissionError):
        return "permission denied (check credentials and bucket policy)"
    if isinstance(e, IsADirectoryError):
        return "is a folder, expected a file"
    kinds = [c.__name__ for c in type(e).__mro__]
    if any("Timeout" in k for k in kinds):
        return "no answer in time: the storage server stalled or is unreachable (storage.timeout_s, storage.retries)"
    if "EndpointConnectionError" in kinds:
        return "cannot connect to the storage endpoint (check storage.endpoint_url)"
    name = type(e).__name__
    text = " ".join(str(e).split())
    return f"{name}: {text}" if text else name


@contextlib.contextmanager
def reported(url: str, doing: str = "") -> Iterator[None]:
    """A storage failure inside the block becomes one MedclfError line naming the URL."""
    try:
        yield
    except MedclfError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend raises its own kinds
        raise MedclfError(f"{url}: {doing}{describe_error(e)}") from None


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[IO[bytes]]:
    """A binary file that appears at `url` complete when the block ends, or not at all."""
    if is_local(url):
        with _local_atomic(local_path(url)) as f:
            yield f
        return
    fs, path = filesystem(url)
    if "memory" in _protocols(fs):
        # memory:// commits whatever was written when the file closes: spool, then put in one call.
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
            yield spool
            spool.seek(0)
            fs.pipe_file(path, spool.read())
        return
    with reported(url, "cannot write: "):
        upload = _Upload(fs.open(path, "wb"), url)
    try:
        yield cast(IO[bytes], upload)  # a file object's methods, delegated
        with reported(url, "upload failed: "):
            upload.file.close()
    except BaseException:
        # Leaving an fsspec write context by an exception would still commit the partial object.
        upload.abandon()
        raise


class _Upload:
    """A remote file being written: a storage failure is one MedclfError line; abandon() leaves nothing."""

    def __init__(self, file: Any, url: str) -> None:
        self.file, self.url = file, url

    def write(self, data: Any) -> int:
        # A block that fills up is uploaded (as a multipart part) inside write().
        with reported(self.url, "upload failed: "):
            return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)

    def abandon(self) -> None:
        """Drop the buffered data and abort the multipart upload, if one was begun."""
        try:
            self.file.discard()
        except Exception as e:  # noqa: BLE001 - the server may be the reason we are here
            log.warning(
                "%s: could not abort its unfinished multipart upload (%s); "
                "a bucket lifecycle rule (AbortIncompleteMultipartUpload) removes such leftovers",
                self.url,
                describe_error(e),
            )
        self.file.closed = True  # never closed (= committed) later, e.g. when garbage collected


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


@contextlib.contextmanager
def _local_atomic(path: str) -> Iterator[IO[bytes]]:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(folder, exist_ok=True)
        f = open(tmp, "wb")
    except OSError as e:
        raise MedclfError(f"{path}: cannot write: {describe_error(e)}") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# Test hook: after writing a file whose URL contains this text, log and sleep a minute, so that a
# test can kill a job between two of its writes (a prepare, a head caching features, a compare).
PAUSE_AFTER_ENV = "MEDCLF_TEST_PAUSE_AFTER_WRITE"


def write_bytes(url: str, data: bytes) -> None:
    with atomic_write(url) as f:
        f.write(data)
    pause_after = os.environ.get(PAUSE_AFTER_ENV)
    if pause_after and pause_after in url:
        log.warning("%s: pausing after writing %s", PAUSE_AFTER_ENV, url)
        time.sleep(60)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove(url: str) -> None:
    """Delete a file or a folder tree; nothing happens if it is absent."""
    fs, path = filesystem(url)
    with reported(url, "cannot remove: "), contextlib.suppress(FileNotFoundError):
        _fresh(fs, path)
        if fs.isdir(path):
            fs.rm(path, recursive=True)
        elif fs.exists(path):
            fs.rm(path)


def check_writable(url: str) -> None:
    """Fail before any work when `url` cannot be written: a missing bucket, or a local path whose
    nearest existing folder is a file or not writable (instead of failing at the first save)."""
    if not is_local(url):
        _check_bucket(url)
        return
    path = os.path.abspath(local_path(url))
    if os.path.isfile(path):
        path = os.path.dirname(path)  # an existing file is replaced within its folder
    while not os.path.exists(path):
        path = os.path.dirname(path)  # the folders to be made: the nearest existing one decides
    if not os.path.isdir(path):
        raise MedclfError(f"{url}: cannot write: {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise MedclfError(f"{url}: cannot write: permission denied on {path}")


def _check_bucket(url: str) -> None:
    fs, path = filesystem(url)
    if not {"s3", "s3a"} & set(_protocols(fs)):
        return
    bucket = path.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:
        raise MedclfError(f"{url}: no such bucket {bucket!r}") from None
    except Exception as e:  # noqa: BLE001
        raise MedclfError(f"{url}: {describe_error(e)}") from None


# ---------------------------------------------------------------- folders


def upload_dir(local_dir: str, url: str) -> None:
    """Copy a local folder's files to `url` (each file atomically; completeness is a manifest's job)."""
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as fin, atomic_write(join(url, rel)) as fout:
                shutil.copyfileobj(fin, fout, 8 << 20)


def download_dir(url: str, local_dir: str) -> str:
    """Copy a remote folder's files into `local_dir` (made fresh); returns local_dir."""
    fs, path = filesystem(url)
    with reported(url):
        _fresh(fs, path)
        # A key ending in "/" is a folder marker (the S3 console's "Create folder"), not a file.
        files = [p for p in fs.find(path) if not p.endswith("/")]
    if not files:
        raise MedclfError(f"{url}: no such folder, or it is empty")
    os.makedirs(local_dir, exist_ok=True)
    root = path.rstrip("/")
    for remote in files:
        rel = remote[len(root) :].lstrip("/")
        dest = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with reported(url, "download failed: "):
            fs.get_file(remote, dest)
    return local_dir
