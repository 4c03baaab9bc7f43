"""Fixtures of the CPU package's tests."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, List

import pytest


# What every compiled kernel of the CPU package (toolkit/cpu/compiled.py) must do, as one fixture:
# ``compiled_checks`` gives the tests of each kernel module the same checks: it builds into an
# empty cache on a Linux host with a C compiler, without a warning; with no compiler it warns once
# and falls back; ``disabled()`` says so; and a build that computes a wrong number is caught by the
# self-check before use.
class CompiledKernelChecks:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        self.tmp_path, self.monkeypatch = tmp_path, monkeypatch
        self._reset: List[ModuleType] = []

    def loaded(self, module: ModuleType) -> Any:
        """The module's kernel, or skip the test where it does not build here."""
        k = module.load()
        if k is None:
            pytest.skip(f"{module._KERNEL.what} does not run here: {module.unavailable_reason()}")
        return k

    def fresh(self, module: ModuleType) -> Path:
        """An empty kernel cache, nothing loaded (the real state comes back after the test)."""
        self.monkeypatch.setenv("XDG_CACHE_HOME", str(self.tmp_path / "cache"))
        cache = self.tmp_path / "cache" / "mitkd" / "kernels"
        module.reset()
        self._reset.append(module)
        return cache

    @staticmethod
    def _can_build() -> bool:
        from toolkit.cpu import compiled

        return sys.platform.startswith("linux") and compiled.find_compiler() is not None

    def builds(self, module: ModuleType, prefix: str) -> None:
        """Built into the (fresh) cache without a warning, named after its source."""
        cache = self.fresh(module)
        if not self._can_build():
            pytest.skip("needs Linux and a C compiler (the fallback is tested separately)")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            k = module.load()
        assert k is not None, module.unavailable_reason()
        assert k.path.parent == cache and k.path.name.startswith(prefix)

    def no_compiler_and_disabled(self, module: ModuleType) -> None:
        """No C compiler: one RuntimeWarning and the fallback; ``disabled()`` says so."""
        from toolkit.cpu import compiled

        self.fresh(module)
        self.monkeypatch.setattr(compiled, "find_compiler", lambda: None)
        with pytest.warns(RuntimeWarning, match="no C compiler"):
            assert module.load() is None
        with module.disabled():
            assert "disabled" in module.unavailable_reason()

    def wrong_build_is_caught(self, module: ModuleType, wrong: str, replacement: str,
                              match: str = "differs from float64") -> None:
        """A copy of the source with ``wrong`` replaced fails the self-check: a warning, no kernel."""
        self.fresh(module)
        if not self._can_build():
            pytest.skip("needs Linux and a C compiler")
        src = module.SOURCE.read_text()
        assert wrong in src
        bad = self.tmp_path / module.SOURCE.name
        bad.write_text(src.replace(wrong, replacement))
        self.monkeypatch.setattr(module._KERNEL, "source", bad)
        with pytest.warns(RuntimeWarning, match=match):
            assert module.load() is None


@pytest.fixture
def compiled_checks(tmp_path, monkeypatch):
    checks = CompiledKernelChecks(tmp_path, monkeypatch)
    yield checks
    for module in checks._reset:
        module.reset()
