"""Per-user cache folders: mode 0700, refused when another user owns them."""
from __future__ import annotations

import os
import stat

import pytest

from toolkit.errors import ToolkitError
from toolkit.utils.cache import check_private_file, private_cache_dir


def test_created_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    d = private_cache_dir("kernels")
    assert d == tmp_path / "xdg" / "mitkd" / "kernels"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700 and stat.S_IMODE(d.parent.stat().st_mode) == 0o700


def test_an_open_folder_of_ours_is_closed(tmp_path):
    d = tmp_path / "c"
    d.mkdir(mode=0o777)
    os.chmod(d, 0o777)
    assert private_cache_dir("kernels", override=d) == d
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_another_users_folder_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "c"
    d.mkdir()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(d).st_uid + 1)
    with pytest.raises(ToolkitError, match="owned by uid .* not by you"):
        private_cache_dir("kernels", override=d)


def test_a_link_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ToolkitError, match="link"):
        private_cache_dir("kernels", override=tmp_path / "link")


def test_cached_library_checks(tmp_path, monkeypatch):
    lib = tmp_path / "k.so"
    lib.write_bytes(b"\x7fELF")
    os.chmod(lib, 0o700)
    assert check_private_file(lib) == lib
    os.chmod(lib, 0o722)
    with pytest.raises(ToolkitError, match="writable by other users"):
        check_private_file(lib)
    os.chmod(lib, 0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(lib).st_uid + 1)
    with pytest.raises(ToolkitError, match="owned by uid"):
        check_private_file(lib)


def test_the_kernel_loader_falls_back_from_a_foreign_cache(tmp_path, monkeypatch):
    from toolkit.cpu import compiled, relation

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)
    monkeypatch.setattr(compiled, "find_compiler", lambda: "cc")
    relation.reset()
    try:
        with pytest.warns(RuntimeWarning, match="not by you"):
            assert relation.load() is None
    finally:
        relation.reset()
    assert not any(p.is_file() for p in cache.rglob("*"))
