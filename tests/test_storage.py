"""Storage helpers: URLs in, atomic writes out, one-line errors."""

import os
import uuid

import pytest

from medclf import storage
from medclf.errors import MedclfError


@pytest.fixture
def mem():
    return f"memory://test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["local", "file", "memory"])
def root(request, tmp_path, mem):
    return {"local": str(tmp_path), "file": f"file://{tmp_path}", "memory": mem}[request.param]


def test_join():
    assert storage.join("s3://b/p/", "a", "/b.csv") == "s3://b/p/a/b.csv"
    assert storage.join("/x", "", "y") == "/x/y"


def test_round_trip_and_listing(root):
    storage.write_json(storage.join(root, "d", "a.json"), {"x": 1})
    storage.write_text(storage.join(root, "d", "b.txt"), "héllo")
    assert storage.read_json(storage.join(root, "d", "a.json")) == {"x": 1}
    assert storage.read_text(storage.join(root, "d", "b.txt")) == "héllo"
    assert storage.listdir(storage.join(root, "d")) == ["a.json", "b.txt"]
    assert storage.listdir(storage.join(root, "missing")) == []
    assert storage.exists(storage.join(root, "d", "a.json"))
    storage.remove(storage.join(root, "d"))
    assert not storage.exists(storage.join(root, "d", "a.json"))


def test_failed_write_leaves_nothing_and_keeps_the_old_file(root):
    url = storage.join(root, "f.bin")
    storage.write_bytes(url, b"old")
    with pytest.raises(RuntimeError):
        with storage.atomic_write(url) as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert storage.read_bytes(url) == b"old"
    with pytest.raises(RuntimeError):
        with storage.atomic_write(storage.join(root, "new.bin")) as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert not storage.exists(storage.join(root, "new.bin"))


def test_local_write_is_invisible_until_complete(tmp_path):
    url = str(tmp_path / "out.csv")
    with storage.atomic_write(url) as f:
        f.write(b"partial")
        assert not os.path.exists(url)  # readers see nothing until the rename
    assert open(url, "rb").read() == b"partial"
    assert os.listdir(tmp_path) == ["out.csv"]  # no temporary left behind


def test_read_errors_name_the_url(tmp_path, mem):
    with pytest.raises(MedclfError, match=r"nope\.csv: no such file"):
        storage.read_bytes(str(tmp_path / "nope.csv"))
    with pytest.raises(MedclfError, match=r"memory://.*x\.csv: no such file"):
        storage.read_bytes(storage.join(mem, "x.csv"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(MedclfError, match="latin1.txt: not UTF-8"):
        storage.read_text(str(tmp_path / "latin1.txt"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MedclfError, match="bad.json: not valid JSON"):
        storage.read_json(str(tmp_path / "bad.json"))


def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MedclfError, match="cannot write"):
        storage.write_text(str(blocker / "under-a-file.txt"), "x")


def test_folder_upload_and_download(tmp_path, mem):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    storage.upload_dir(str(src), storage.join(mem, "model"))
    dest = storage.download_dir(storage.join(mem, "model"), str(tmp_path / "dest"))
    assert (tmp_path / "dest" / "a.txt").read_text() == "a"
    assert open(os.path.join(dest, "sub", "b.txt")).read() == "b"
    with pytest.raises(MedclfError, match="no such folder"):
        storage.download_dir(storage.join(mem, "nothing"), str(tmp_path / "d2"))


@pytest.mark.parametrize(
    "url, folder, marker",
    [
        ("s3://bucket/run/pred.csv", "s3://bucket/run", "s3://bucket/run/m"),
        ("pred.csv", ".", "./m"),
        ("/pred.csv", "/", "/m"),
        ("file:///tmp/pred.csv", "file:///tmp", "file:///tmp/m"),
        ("memory://pred.csv", "memory://", "memory://m"),  # a scheme's root keeps its "//"
    ],
)
def test_the_folder_of_a_file_and_a_name_in_it(url, folder, marker):
    assert storage.parent(url) == folder and storage.join(folder, "m") == marker
