"""A pytest plugin (loaded by tests/conftest.py): under ``CI=true`` a skip for want of something
that ``.ci/run`` installs is a failure, and the per-test timeout must be active.

Locally a test skips with its reason when, say, Slurm or tcmalloc is not installed. CI installs
them, so there the same skip means the installation broke and the test silently stopped
running: it fails instead. Skips for anything CI does not provide (a GPU, a C compiler choice,
a host that has bf16) stay skips.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import pytest

#: What .ci/run installs (apt packages, pip packages, the demo's registry packages, the launcher
#: that `make setup` installs) -> how a skip for its absence reads.
CI_DEPENDENCIES = {
    "numactl": r"\bnumactl\b",
    "slurm-wlm": r"\bslurm(ctld|d)?\b|\bsinfo\b|\bsbatch\b",
    "munge": r"\bmunged?\b",
    "libtcmalloc-minimal4": r"\btcmalloc\b",
    "libjemalloc2": r"\bjemalloc\b",
    "triton": r"triton is not installed|install [^)]*\btriton\b",
    "the demo's registry packages (scripts/fetch_resources.sh)": r"fetch_resources\.sh|not fetched|demo resource missing",
    "the deepspeed launcher": r"deepspeed launcher",
    "pytest-timeout": r"pytest[-_]timeout",
}
_PATTERNS = {dep: re.compile(rx, re.IGNORECASE) for dep, rx in CI_DEPENDENCIES.items()}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def ci_dependency(reason: str) -> Optional[str]:
    """The CI-installed dependency a skip reason names, or None."""
    for dep, rx in _PATTERNS.items():
        if rx.search(reason or ""):
            return dep
    return None


def pytest_configure(config: pytest.Config) -> None:
    if in_ci() and not config.pluginmanager.hasplugin("timeout"):
        raise pytest.UsageError("CI=true: pytest-timeout is not installed (pip install -e .[test]); without it a hung "
                                "test stalls CI until its time limit")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # noqa: ANN201 - hook wrapper
    outcome = yield
    rep = outcome.get_result()
    if not in_ci() or not rep.skipped or hasattr(rep, "wasxfail"):
        return
    reason = str(call.excinfo.value) if call.excinfo is not None else ""
    dep = ci_dependency(reason)
    if dep is not None:
        rep.outcome = "failed"
        rep.longrepr = f"CI=true: this test skipped for want of {dep}, which .ci/run installs: {reason}"
