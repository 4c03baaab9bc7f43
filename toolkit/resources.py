"""Where the shipped files are: DeepSpeed JSONs, example job YAMLs, reference model configs.

The repository keeps them at the top level (``ds_configs/``, ``configs/``); a built wheel or
sdist install carries copies inside the package (``toolkit/shipped/ds_configs``,
``toolkit/shipped/configs``, put there by ``setup.py``'s build step). These helpers return
whichever exists, the package copy first, so ``--ds-config zero2_bf16.json``,
``ds_config: auto`` and ``--config distill_bert_large.yaml`` work from any folder. Nothing
here imports torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

PACKAGE_DIR = Path(__file__).resolve().parent
#: Inside an installed package: the copies of the top-level folders.
SHIPPED_DIR = PACKAGE_DIR / "shipped"


def checkout_root() -> Optional[Path]:
    """The repository root when the toolkit runs from a source checkout, else None."""
    root = PACKAGE_DIR.parent
    if (root / "setup.py").is_file() and (root / "ds_configs").is_dir() and (root / "launchers").is_dir():
        return root
    return None


def _folder(name: str) -> Path:
    packaged = SHIPPED_DIR / name
    if packaged.is_dir():
        return packaged
    root = checkout_root()
    return root / name if root is not None else packaged


def ds_config_dir() -> Path:
    """The shipped DeepSpeed JSONs (``zero2_bf16.json``, ``cpu_fp32.json``, ...)."""
    return _folder("ds_configs")


def config_dir() -> Path:
    """The shipped example job YAMLs (``distill_bert_large.yaml``, ...)."""
    return _folder("configs")


def model_config_dir() -> Path:
    """Reference ``config.json`` directories of real-size teachers and students
    (``bert-large-uncased``, ``ernie-3.0-xbase-zh``, ...): enough for ``toolkit plan``."""
    return config_dir() / "models"


def shipped_names(folder: Path, pattern: str) -> List[str]:
    return sorted(p.name for p in folder.glob(pattern)) if folder.is_dir() else []


def find_shipped(path: Union[str, Path], folder: Path, suffix: str) -> Optional[Path]:
    """``path`` if it is a file; else a shipped file of that name in ``folder`` (the suffix
    may be left out: ``zero2_bf16`` finds ``zero2_bf16.json``); else None."""
    p = Path(path)
    if p.is_file():
        return p
    if p.parent != Path("."):   # a path with folders names one file: no fallback
        return None
    for name in (p.name, p.name + suffix):
        cand = folder / name
        if cand.is_file():
            return cand
    return None


def python_path_entry() -> Optional[str]:
    """What a child process needs on ``PYTHONPATH`` to import this toolkit: the checkout root
    when it runs from a checkout that is not installed, else None (an installed package is
    found by the interpreter itself)."""
    root = checkout_root()
    return str(root) if root is not None else None
