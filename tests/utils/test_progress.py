"""Progress bar is off on non-main ranks, off without a TTY, and off by env switch."""
from __future__ import annotations

import sys

from toolkit.utils.progress import ProgressBar, progress_enabled


class FakeTTY:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_disabled_cases(monkeypatch):
    monkeypatch.delenv("TOOLKIT_NO_PROGRESS", raising=False)  # CI exports it
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert progress_enabled(True)
    assert not progress_enabled(False)
    monkeypatch.setenv("TOOLKIT_NO_PROGRESS", "1")
    assert not progress_enabled(True)


def test_no_tty_is_noop(monkeypatch):
    bar = ProgressBar(10, is_main=True)  # pytest captures stderr: not a TTY
    bar.update(1, loss=0.5, tokens_per_s=1000)
    bar.close()
    assert not bar.enabled


def test_draws_loss_and_throughput(monkeypatch):
    monkeypatch.delenv("TOOLKIT_NO_PROGRESS", raising=False)
    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    monkeypatch.delenv("TOOLKIT_NO_PROGRESS", raising=False)
    with ProgressBar(4, is_main=True) as bar:
        bar.update(2, loss=1.25, tokens_per_s=512)
    assert "loss=1.2500" in fake.text and "tok/s=512" in fake.text and "2/4" in fake.text
