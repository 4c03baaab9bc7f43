"""Durable, all-or-nothing writes: files and whole folders.

A job's published outputs (models, reports, ``results.json``) must appear whole or not at
all: a crash or a kill leaves either the previous complete version or nothing, never a
folder that looks finished but lacks a file.

* :func:`write_text_atomic` / :func:`write_json_atomic` / :func:`replacing`: write a sibling
  temp file, fsync it, rename it over the target, fsync the folder.
* :func:`publish_dir`: a context manager that yields a temp folder next to the target; on a
  clean exit it writes the completion marker (``COMPLETE.json``) last, fsyncs the tree and
  renames the folder into place. A folder is complete exactly when it holds the marker.

Layout next to a published folder ``<name>``::

    .tmp-<name>-<pid>-<hex>/   being written; removed on failure or by the next publish
    .old-<name>/               the previous version during the swap (restored if a kill hits
                               between the two renames)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

PathLike = Union[str, Path]

#: The completion marker of a published folder, written last.
MARKER = "COMPLETE.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def fsync_file(path: PathLike) -> None:
    """Flush one file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a folder's entries (renames into it) to disk, where the filesystem allows."""
    try:
        fsync_file(path)
    except OSError:
        pass  # some filesystems cannot fsync directories; the rename is still atomic


def fsync_tree(root: PathLike) -> None:
    """fsync every file and folder under ``root``."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync_file(Path(dirpath) / f)
        fsync_dir(dirpath)


def write_bytes_durable(path: PathLike, data: bytes) -> None:
    """Write and fsync ``path`` in place (for files inside a folder that is renamed later)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_text_atomic(path: PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_bytes_durable(tmp, text.encode("utf-8"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_json_atomic(path: PathLike, obj: Any, default: Any = None) -> None:
    """:func:`write_text_atomic` of ``obj`` as indented JSON."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=default) + "\n")


@contextlib.contextmanager
def replacing(path: PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path`` for a writer that takes a path (a plot, a task's
    prediction writer); on success it is fsynced and renamed over ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if tmp.exists():   # (a writer may decide there is nothing to write)
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_published(path: PathLike) -> bool:
    """True when ``path`` is a folder that :func:`publish_dir` completed."""
    return (Path(path) / MARKER).is_file()


def read_published(path: PathLike) -> Optional[Dict[str, Any]]:
    """The completion marker of a published folder, or None when it has none (or it is unreadable)."""
    try:
        return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def marker_digest(path: PathLike) -> Optional[str]:
    """sha256 of the folder's completion marker: changes every time the folder is published."""
    try:
        return hashlib.sha256((Path(path) / MARKER).read_bytes()).hexdigest()
    except OSError:
        return None


def recover(final: PathLike) -> None:
    """Undo what an interrupted publish of ``final`` left: restore ``.old-<name>`` when a kill
    hit between the two renames, and remove temp folders. Call while holding the output lock."""
    final = Path(final)
    parent = final.parent
    if not parent.is_dir():
        return
    old = parent / f"{OLD_PREFIX}{final.name}"
    if old.is_dir():
        if not final.exists():   # .old-<name> only ever holds a complete earlier version
            os.rename(old, final)
            fsync_dir(parent)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for p in parent.glob(f"{TMP_PREFIX}{final.name}-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextlib.contextmanager
def publish_dir(final: PathLike, kind: str = "folder", meta: Optional[Dict[str, Any]] = None,
                marker: bool = True) -> Iterator[Path]:
    """Build a folder in a temp sibling and move it into place whole.

    Usage::

        with publish_dir(out / "model", kind="model") as tmp:
            save_things(tmp)
        # out/model now exists, complete, with COMPLETE.json written last

    On an exception the temp folder is removed and ``final`` (an earlier complete version,
    if any) is left as it was.

    Args:
        final: the folder to publish.
        kind: what it holds (recorded in the marker).
        meta: extra JSON-able fields for the marker.
        marker: False for folders whose every file is for someone else (a leaderboard
            submission): still renamed into place whole, without ``COMPLETE.json``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        info = {"kind": kind, "time": time.time(), "host": socket.gethostname(), "id": secrets.token_hex(8),
                "files": files, **(meta or {})}
        fsync_tree(tmp)
        if marker:
            write_bytes_durable(tmp / MARKER, (json.dumps(info, indent=1) + "\n").encode("utf-8"))
            fsync_dir(tmp)
        old = final.parent / f"{OLD_PREFIX}{final.name}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(final.parent)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
