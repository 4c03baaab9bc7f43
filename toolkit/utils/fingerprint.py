"""Cheap content fingerprints of input files and folders.

A fingerprint tells whether an input changed since a run used it, without reading large
files whole: a file's is its size plus a sha256 of its first and last :data:`BLOCK` bytes
(the whole file when it is small). A folder that a job published (``COMPLETE.json``, see
:mod:`toolkit.utils.fsio`) is fingerprinted by its marker, which changes with every publish;
any other folder by the fingerprints of its top-level files.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Union

from toolkit.utils.fsio import MARKER, marker_digest

BLOCK = 1 << 16
PathLike = Union[str, Path]


def file_digest(path: PathLike, block: int = BLOCK) -> Dict[str, Any]:
    """``{"size": bytes, "sha256_head_tail": hex}`` of one file (OSError if unreadable)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        if size <= 2 * block:
            h.update(fh.read())
        else:
            h.update(fh.read(block))
            fh.seek(size - block)
            h.update(fh.read(block))
    return {"size": size, "sha256_head_tail": h.hexdigest()}


def path_fingerprint(path: PathLike) -> Dict[str, Any]:
    """The fingerprint of a file or folder (``{"missing": true}`` when it does not exist)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        digest = marker_digest(p)
        if digest is not None:
            return {"published": digest}
        return {"files": {c.name: file_digest(c) for c in sorted(p.iterdir())
                          if c.is_file() and not c.name.startswith(".") and c.name != MARKER}}
    return {"missing": True}


def digest(obj: Any) -> str:
    """sha256 of ``obj``'s canonical JSON (sorted keys): the identity of a config dict."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()
