"""Per-user cache folders that nobody else can write into.

The toolkit loads code from its caches (compiled CPU kernels are shared libraries), so a cache
another user can write to would let that user run code in your jobs. :func:`private_cache_dir`
returns a folder owned by the current user with mode 0700, creating it so, and refuses one
owned by anybody else. :func:`check_private_file` does the same for a file found in it before
it is loaded.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Optional, Union

from toolkit.errors import ToolkitError


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/mitkd``, else ``~/.cache/mitkd``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mitkd"


def _ensure_private(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as e:
        raise ToolkitError(f"{path}: cannot create the cache folder: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ToolkitError(f"{path}: the cache folder is a link or not a folder; refusing to use it")
    if st.st_uid != os.getuid():
        raise ToolkitError(f"{path}: the cache folder is owned by uid {st.st_uid}, not by you (uid {os.getuid()}); "
                           f"refusing to load code from it: point the cache at a folder of your own")
    if st.st_mode & 0o077:
        # Ours, but others may read or write it (made by an older version or by hand): close it.
        os.chmod(path, 0o700)


def private_cache_dir(name: str, override: Optional[Union[str, Path]] = None) -> Path:
    """A per-user cache folder ``<cache root>/<name>`` (or ``override``), mode 0700.

    Args:
        name: the sub-folder, e.g. ``"kernels"``.
        override: a folder given by the user instead (the same checks apply to it).

    Raises:
        ToolkitError: the folder (or the cache root) is owned by another user, or is a link.
    """
    if override:
        path = Path(os.path.expanduser(str(override)))
    else:
        root = cache_root()
        _ensure_private(root)
        path = root / name
    _ensure_private(path)
    return path


def check_private_file(path: Union[str, Path]) -> Path:
    """``path`` if it is a regular file owned by the current user that no one else can write.

    Raises:
        ToolkitError: otherwise (names the file and the owner).
    """
    p = Path(path)
    st = p.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise ToolkitError(f"{p}: not a regular file; refusing to load it")
    if st.st_uid != os.getuid():
        raise ToolkitError(f"{p}: owned by uid {st.st_uid}, not by you (uid {os.getuid()}); refusing to load it")
    if st.st_mode & 0o022:
        raise ToolkitError(f"{p}: writable by other users; refusing to load it (delete it to rebuild)")
    return p
