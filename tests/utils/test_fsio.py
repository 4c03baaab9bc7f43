"""Atomic publishing: a folder appears whole or not at all, the marker written last."""
from __future__ import annotations

import json
import os

import pytest

from toolkit.utils import fsio


def test_publish_writes_the_marker_last_and_replaces_whole(tmp_path):
    final = tmp_path / "model"
    with fsio.publish_dir(final, kind="model", meta={"step": 3}) as tmp:
        assert not final.exists() and tmp.parent == tmp_path
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"123")
    marker = json.loads((final / fsio.MARKER).read_text())
    assert marker["kind"] == "model" and marker["step"] == 3
    assert marker["files"] == {"config.json": 2, "sub/w.bin": 3}
    first = fsio.marker_digest(final)
    with fsio.publish_dir(final) as tmp:
        (tmp / "config.json").write_text('{"v": 2}')
    assert not (final / "sub").exists() and fsio.marker_digest(final) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]   # no temp or old folder left


def test_a_failure_leaves_the_previous_version(tmp_path):
    final = tmp_path / "model"
    with fsio.publish_dir(final) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with fsio.publish_dir(final) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("killed")
    assert (final / "a").read_text() == "old" and fsio.is_published(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_recover_after_a_kill_between_the_renames(tmp_path):
    final = tmp_path / "model"
    with fsio.publish_dir(final) as tmp:
        (tmp / "a").write_text("old")
    os.rename(final, tmp_path / ".old-model")               # the first rename happened
    (tmp_path / ".tmp-model-1-ab").mkdir()                   # the new one never moved in
    fsio.recover(final)
    assert (final / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_markerless_folder_and_atomic_files(tmp_path):
    with fsio.publish_dir(tmp_path / "subs", marker=False) as tmp:
        (tmp / "CoLA.tsv").write_text("index\tprediction\n")
    assert [p.name for p in (tmp_path / "subs").iterdir()] == ["CoLA.tsv"]
    fsio.write_json_atomic(tmp_path / "results.json", {"a": 1})
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    with pytest.raises(RuntimeError):
        with fsio.replacing(tmp_path / "results.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "subs"]
