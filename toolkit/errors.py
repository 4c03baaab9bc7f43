"""User-facing errors.

Every bad input the user can fix raises a :class:`ToolkitError` (or a subclass) whose
message says what was wrong, where (file and line, or config field) and what to do.
The CLI prints these as one line and exits with status 2 instead of a traceback.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class ToolkitError(Exception):
    """An error the user can act on. The message is shown verbatim."""


class DataError(ToolkitError):
    """Bad input data: names the file and, where known, the line (1-based)."""

    def __init__(self, path: Union[str, Path, None], message: str, line: Optional[int] = None,
                 hint: Optional[str] = None):
        self.path = str(path) if path is not None else None
        self.line = line
        where = self.path or "<input>"
        if line is not None:
            where = f"{where}:{line}"
        text = f"{where}: {message}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)


class ConfigError(ToolkitError):
    """A bad or self-contradictory configuration: names the field (and the file)."""

    def __init__(self, field: str, message: str, source: Optional[Union[str, Path]] = None):
        self.field = field
        self.message = message
        self.source = str(source) if source is not None else None
        prefix = f"{self.source}: " if self.source else ""
        super().__init__(f"{prefix}config field '{field}': {message}")


class TrainingError(ToolkitError):
    """Training cannot go on (e.g. too many non-finite losses). Checkpoints stay intact."""


class SharedFolderError(ToolkitError):
    """A folder every rank writes into (``output_dir``) is not one shared folder on all nodes."""

    def __init__(self, path: Union[str, Path], field: str, problem: str):
        self.path = str(path)
        self.field = field
        super().__init__(f"{field} {self.path} is not one folder shared by every rank: {problem}. Put {field} on "
                         f"a filesystem all nodes mount at the same path (NFS, Lustre, GPFS...); checkpoints and "
                         f"outputs are written there by several ranks")
