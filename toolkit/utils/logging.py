"""Rank-aware logging and the run logger (TensorBoard + ``metrics.jsonl`` + console).

Rank is read from the launcher's environment (``RANK``, else ``SLURM_PROCID``, else
``OMPI_COMM_WORLD_RANK``) so logging works before the process group exists and without
importing the distributed package here. Rank 0 prints INFO and up; other ranks only WARNING
and up, so a 64-rank job does not print every line 64 times.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

ROOT = "toolkit"
_FMT = "%(asctime)s [%(levelname)s] [rank{rank}] %(name)s: %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"
_RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def env_rank() -> int:
    """Global rank as set by the launcher; 0 when none is set."""
    for var in _RANK_VARS:
        val = os.environ.get(var)
        if val is not None and val.strip().lstrip("-").isdigit():
            return int(val)
    return 0


def _root_logger(rank: int) -> logging.Logger:
    root = logging.getLogger(ROOT)
    # The handler lives on the logging module's own registry, so this is configured once
    # per process without any state of ours.
    if not any(getattr(h, "_toolkit_console", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h._toolkit_console = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter(_FMT.format(rank=rank), _DATEFMT))
        h.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        root.addHandler(h)
        root.setLevel(logging.DEBUG)
        # Propagate so that handlers on the root logger (pytest's caplog, an embedding
        # application's) still see toolkit records.
        root.propagate = True
    return root


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``toolkit`` namespace (rank 0: INFO to console; others: WARNING)."""
    _root_logger(env_rank())
    if name != ROOT and not name.startswith(ROOT + "."):
        name = f"{ROOT}.{name}"
    return logging.getLogger(name)


def configure_logging(out_dir: Union[str, Path], rank: Optional[int] = None) -> Path:
    """Also write every record (DEBUG and up) of this rank to ``out_dir/logs/rank{r}.log``.

    Every rank writes its own file: that is where a failing non-zero rank's warnings end up.
    Calling it again with the same directory is a no-op. Returns the log file path.
    """
    r = env_rank() if rank is None else int(rank)
    root = _root_logger(r)
    path = (Path(out_dir) / "logs" / f"rank{r}.log").resolve()
    for h in root.handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path:
            return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(logging.Formatter(_FMT.format(rank=r), _DATEFMT))
    fh.setLevel(logging.DEBUG)
    root.addHandler(fh)
    return path


def close_log_file(path: Union[str, Path]) -> None:
    """Detach and close the per-rank file handler that :func:`configure_logging` opened."""
    root = logging.getLogger(ROOT)
    target = Path(path).resolve()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == target:
            root.removeHandler(h)
            h.close()


def _as_number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        try:
            return float(v.item())
        except (TypeError, ValueError):
            return None
    return None


def _json_value(v: Any) -> Any:
    num = _as_number(v)
    if num is None:
        return v if isinstance(v, (str, list, dict)) or v is None else str(v)
    if not math.isfinite(num):
        # Strict JSON has no NaN/Infinity; keep the information as a string.
        return str(num)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return num


def _fmt(v: Any) -> str:
    num = _as_number(v)
    if num is None:
        return str(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if num != 0 and (abs(num) < 1e-3 or abs(num) >= 1e5):
        return f"{num:.3e}"
    return f"{num:.4f}"


class RunLogger:
    """Metrics sink for one run: TensorBoard scalars, ``metrics.jsonl`` and a console line.

    Only the main process writes files; other ranks accept calls and do nothing, so recipes
    can call ``log`` unconditionally.

    Args:
        out_dir: run output directory; files go to ``out_dir/metrics.jsonl`` and
            ``out_dir/tensorboard/``.
        is_main: whether this is global rank 0.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(self, out_dir: Union[str, Path], is_main: bool, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.is_main = bool(is_main)
        self._logger = get_logger("run")
        self._jsonl = None
        self._tb = None
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run continues the same file.
        self._jsonl = open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "train") -> None:
        """Record ``metrics`` at ``step``; tensors are converted with ``.item()``."""
        if not self.is_main:
            return
        record: Dict[str, Any] = {"step": int(step), "prefix": prefix, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            record[k] = _json_value(v)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            # Flushed per call so a killed job keeps its curve up to the last step.
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                num = _as_number(v)
                if num is not None:
                    self._tb.add_scalar(f"{prefix}/{k}", num, int(step))
        line = " | ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        self._logger.info("%s step %d | %s", prefix, int(step), line)

    def close(self) -> None:
        """Flush and close the files (safe to call twice)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
