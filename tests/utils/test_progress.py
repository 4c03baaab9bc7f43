"""Progress bar is drawn on the main rank only, and only when stderr is a terminal."""
from __future__ import annotations

import sys

from toolkit.utils.progress import ProgressBar, progress_enabled


class FakeTTY:
    def __init__(self, tty: bool = True):
        self.text = ""
        self.tty = tty

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_disabled_cases(monkeypatch):
    monkeypatch.setattr(sys, "stderr", FakeTTY())
    assert progress_enabled(True)
    assert not progress_enabled(False)
    monkeypatch.setattr(sys, "stderr", FakeTTY(tty=False))
    assert not progress_enabled(True)


def test_no_tty_is_noop():
    bar = ProgressBar(10, is_main=True)  # pytest captures stderr: not a TTY
    bar.update(1, loss=0.5, tokens_per_s=1000)
    bar.close()
    assert not bar.enabled


def test_draws_loss_and_throughput(monkeypatch):
    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    with ProgressBar(4, is_main=True) as bar:
        bar.update(2, loss=1.25, tokens_per_s=512)
    assert "loss=1.2500" in fake.text and "tok/s=512" in fake.text and "2/4" in fake.text
