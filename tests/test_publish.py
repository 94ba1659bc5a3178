"""A published folder (adapted model, classifier) loads only when it is complete.

manifest.publish_dir writes an `.incomplete` marker first and removes it after the manifest, so a
publish killed anywhere (here: SIGKILL at the test pause just before the manifest) leaves a folder
that every reader refuses, locally and when fetched from S3 (tests/test_s3.py); and a malformed
manifest is one line, never a traceback.
"""

from __future__ import annotations

import pytest

from medclf import manifest, models
from medclf.errors import MedclfError
from tests.helpers import publish_killed_before_the_manifest, run_cli


def test_a_publish_killed_midway_leaves_a_folder_that_never_loads(tiny_bert, tmp_path, capsys):
    target = tmp_path / "model"
    publish_killed_before_the_manifest(tiny_bert, str(target))
    assert (target / "model.safetensors").exists() and not (target / manifest.MANIFEST).exists()
    with pytest.raises(MedclfError, match=r"incomplete model \(its publishing was interrupted"):
        models.resolve(str(target))
    code, line = run_cli(["mlm", f"out={tmp_path / 'run'}", f"model={target}"], capsys)
    assert code == 2 and "incomplete model" in line

    # replacing a complete copy: killed midway, the older copy is no longer "complete" either
    manifest.publish_dir(str(tiny_bert), str(target))
    assert not (target / manifest.INCOMPLETE).exists()
    models.resolve(str(target))
    publish_killed_before_the_manifest(tiny_bert, str(target))
    with pytest.raises(MedclfError, match="incomplete model"):
        models.resolve(str(target))
    manifest.publish_dir(str(tiny_bert), str(target))  # a rerun publishes it whole
    assert manifest.verify(str(target), "model")


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"files": {"config.json": 5}}', r"manifest\.json: malformed entry for 'config\.json'"),
        ('{"files": {"config.json": {"size": "12", "sha256": "ab"}}}', "malformed entry"),
        ('{"files": [1, 2]}', "not a model manifest"),
        ('{"files": {"config.json"', "not valid JSON"),
    ],
)
def test_a_malformed_manifest_is_one_line(text, expected, tiny_bert, tmp_path, capsys):
    target = tmp_path / "model"
    manifest.publish_dir(str(tiny_bert), str(target))
    (target / manifest.MANIFEST).write_text(text)
    with pytest.raises(MedclfError, match=expected):
        models.resolve(str(target))
    code, line = run_cli(["mlm", f"out={tmp_path / 'run'}", f"model={target}"], capsys)
    assert code == 2 and "manifest.json" in line
