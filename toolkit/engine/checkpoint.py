"""Atomic checkpoints: a kill at any moment leaves the previous complete one loadable.

Layout under ``ckpt_dir``::

    .tmp-<tag>/            being written (all ranks), removed by the next save
    .old-<tag>/            previous copy while the same tag is re-saved (a fallback until
                           the new <tag>/ is in place)
    <tag>/                 renamed from .tmp-<tag> once complete
        COMPLETE           JSON marker written last by rank 0 (tag, step, world size, time)
        client_state_rank<r>.pt
        <payload>          e.g. DeepSpeed's <tag>/ folder, or model.pt
    latest                 the newest tag, replaced with os.replace

A directory counts as a checkpoint only when it has ``COMPLETE``; the rename makes the
marker and payload appear together. Loading prefers ``latest`` and otherwise takes the
complete checkpoint with the highest step number in its tag.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from toolkit.errors import ToolkitError
from toolkit.utils.fsio import fsync_dir as _fsync_dir
from toolkit.utils.fsio import fsync_file as _fsync_file
from toolkit.utils.fsio import fsync_tree as _fsync_tree
from toolkit.utils.fsio import write_bytes_durable as _write_durable

MARKER = "COMPLETE"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
PathLike = Union[str, Path]


def tag_step(tag: str) -> int:
    """The last integer in a tag (``step120`` -> 120); -1 when there is none."""
    nums = re.findall(r"\d+", tag)
    return int(nums[-1]) if nums else -1


def _check_tag(tag: str) -> str:
    tag = str(tag)
    if not tag or tag.startswith(".") or "/" in tag or tag in (LATEST,) or tag.startswith(TMP_PREFIX):
        raise ToolkitError(f"invalid checkpoint tag {tag!r}: use a plain name such as 'step100'")
    return tag


def is_complete(path: PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(path: PathLike) -> Dict[str, Any]:
    """The COMPLETE marker's JSON (tag, step, world_size, time)."""
    try:
        data = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ToolkitError(f"{Path(path) / MARKER}: unreadable checkpoint marker ({e}); "
                           f"delete this checkpoint folder to fall back to an older one") from None
    if not isinstance(data, dict) or not data.get("tag"):
        raise ToolkitError(f"{Path(path) / MARKER}: checkpoint marker without a tag; "
                           f"delete this checkpoint folder to fall back to an older one")
    return data


def list_complete(ckpt_dir: PathLike) -> List[Path]:
    """Complete checkpoints, oldest first (by step in the tag, then modification time)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if not p.is_dir() or not is_complete(p):
            continue
        if not p.name.startswith("."):
            found.append(p)
        elif p.name.startswith(OLD_PREFIX) and not is_complete(root / p.name[len(OLD_PREFIX):]):
            found.append(p)  # a kill hit while this tag was being re-saved
    return sorted(found, key=lambda p: (tag_step(p.name), p.stat().st_mtime))


def find_checkpoint(ckpt_dir: PathLike, tag: Optional[str] = None) -> Optional[Path]:
    """The checkpoint to resume from, or None when there is no complete one.

    ``ckpt_dir`` may itself be a complete checkpoint folder. With ``tag``, that checkpoint
    must exist and be complete (else ToolkitError).
    """
    root = Path(ckpt_dir)
    if tag is not None:
        path = root / _check_tag(tag)
        if not is_complete(path) and is_complete(root / f"{OLD_PREFIX}{tag}"):
            path = root / f"{OLD_PREFIX}{tag}"
        if not is_complete(path):
            raise ToolkitError(f"{path}: no complete checkpoint with tag {tag!r} "
                               f"(complete ones: {[p.name for p in list_complete(root)]})")
        return path
    if is_complete(root):
        return root
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        if name and not name.startswith("."):
            for cand in (root / name, root / f"{OLD_PREFIX}{name}"):
                if is_complete(cand):
                    return cand
    done = list_complete(root)
    return done[-1] if done else None


def clean_stale(ckpt_dir: PathLike) -> None:
    """Remove leftovers of interrupted saves (call on rank 0 only).

    ``.tmp-*`` always goes; ``.old-<tag>`` only once a complete ``<tag>`` replaced it.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        stale = p.name.startswith(TMP_PREFIX) or (
            p.name.startswith(OLD_PREFIX) and is_complete(root / p.name[len(OLD_PREFIX):]))
        if stale:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def prune(ckpt_dir: PathLike, keep_last: int, keep: Optional[Path] = None) -> None:
    """Delete all but the ``keep_last`` newest complete checkpoints (never ``keep``)."""
    if keep_last is None or keep_last <= 0:
        return
    done = list_complete(ckpt_dir)
    for p in done[:-keep_last]:
        if keep is not None and p.resolve() == keep.resolve():
            continue
        # Rename first so a kill mid-delete never leaves a half-deleted folder that still
        # carries its COMPLETE marker.
        trash = p.parent / f"{TMP_PREFIX}del-{p.name}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)


def client_state_file(path: PathLike, rank: int) -> Path:
    return Path(path) / f"client_state_rank{rank}.pt"


def read_client_state(path: PathLike, rank: int) -> Dict[str, Any]:
    """This rank's client state; falls back to rank 0's when the world size changed."""
    f = client_state_file(path, rank)
    if not f.is_file():
        f = client_state_file(path, 0)
    if not f.is_file():
        return {}
    # weights_only: the toolkit saves only tensors and plain types here, and a checkpoint
    # folder (shared, copied from elsewhere) must never run code when it is loaded.
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors all mean "not loadable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToolkitError(f"{f}: unreadable checkpoint state ({first[:200]}); delete this checkpoint folder to "
                           f"resume from an older one, or start fresh (resume=false or a new output_dir)") from None
    if not isinstance(state, dict):
        raise ToolkitError(f"{f}: checkpoint state is a {type(state).__name__}, not a mapping; delete this "
                           f"checkpoint folder to resume from an older one, or start fresh")
    return state


def write_atomic(ckpt_dir: PathLike, tag: str, write_payload: Callable[[Path], None],
                 client_state: Optional[Dict[str, Any]] = None, *, rank: int = 0, world_size: int = 1,
                 barrier: Callable[[], None] = lambda: None, keep_last: Optional[int] = None,
                 meta: Optional[Dict[str, Any]] = None) -> Path:
    """Write one checkpoint atomically; every rank calls it with the same ``tag``.

    Args:
        ckpt_dir: folder holding all checkpoints of a run.
        tag: checkpoint name, e.g. ``step120`` (its last integer orders checkpoints).
        write_payload: called on every rank with the temporary folder to write into.
        client_state: this rank's extra state (step counters, data position, RNG).
        rank, world_size, barrier: the process group (defaults: one process).
        keep_last: keep only this many newest complete checkpoints.
        meta: extra JSON-able fields for the COMPLETE marker.

    Returns:
        The final checkpoint folder ``ckpt_dir/<tag>``.
    """
    root = Path(ckpt_dir)
    tag = _check_tag(tag)
    tmp, final = root / f"{TMP_PREFIX}{tag}", root / tag
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        clean_stale(root)
        tmp.mkdir()
    barrier()
    write_payload(tmp)
    cs = client_state_file(tmp, rank)
    torch.save(dict(client_state or {}), cs)
    _fsync_file(cs)
    barrier()
    if rank == 0:
        _fsync_tree(tmp)
        marker = {"tag": tag, "step": tag_step(tag), "world_size": world_size, "time": time.time()}
        marker.update(meta or {})
        _write_durable(tmp / MARKER, json.dumps(marker, indent=1).encode("utf-8"))
        _fsync_dir(tmp)
        old = root / f"{OLD_PREFIX}{tag}"
        if final.exists():
            # Re-saving a tag: keep the old copy loadable under .old-<tag> until the new
            # one is in place.
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        latest_tmp = root / f"{TMP_PREFIX}{LATEST}"
        _write_durable(latest_tmp, tag.encode("utf-8"))
        os.replace(latest_tmp, root / LATEST)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        if keep_last:
            prune(root, keep_last, keep=final)
    barrier()
    return final
