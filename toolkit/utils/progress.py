"""A tqdm progress bar shown only on rank 0 and only when stderr is a terminal (logs, CI and
batch jobs get the periodic log lines instead)."""
from __future__ import annotations

import sys
from typing import Any, Optional

from tqdm import tqdm


def progress_enabled(is_main: bool) -> bool:
    """Whether a bar should be drawn: on the main rank when stderr is a TTY."""
    return is_main and sys.stderr.isatty()


class ProgressBar:
    """Steps bar with loss and tokens/s; every method is a no-op when disabled.

    Args:
        total: number of optimizer steps of the run.
        is_main: global rank 0.
        initial: step to start from (a resumed run).
        desc: label in front of the bar.
    """

    def __init__(self, total: Optional[int], is_main: bool, initial: int = 0, desc: str = "train"):
        self.enabled = progress_enabled(is_main)
        self._bar = (tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)
                     if self.enabled else None)

    def update(self, n: int = 1, loss: Optional[float] = None, tokens_per_s: Optional[float] = None,
               **extra: Any) -> None:
        """Advance ``n`` steps and show the latest loss / throughput."""
        if self._bar is None:
            return
        post = {}
        if loss is not None:
            post["loss"] = f"{float(loss):.4f}"
        if tokens_per_s is not None:
            post["tok/s"] = f"{float(tokens_per_s):.0f}"
        post.update({k: str(v) for k, v in extra.items()})
        if post:
            self._bar.set_postfix(post, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
