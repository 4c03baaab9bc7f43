"""The oldest versions of the core libraries the toolkit runs on, and the check at import.

One table serves ``setup.py`` (it reads :data:`MINIMUMS` without importing the package) and
``import toolkit``, which refuses an older install with a message naming the package, the
version found and what to install. The check reads installed versions from package metadata
(``importlib.metadata``), so ``toolkit --help`` never imports torch.

Why each floor (transformers' and deepspeed's found by running the tests on older releases):

* torch 2.4: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (native bf16 only,
  toolkit/engine/precision.py) is new in 2.4.
* transformers 5.0: ``BertTokenizerFast(vocab=<vocab.txt>)`` (toolkit/models/encoder.py
  ``load_tokenizer``; 4.x takes ``vocab_file=`` and fails), ``from_pretrained(dtype=...)``, the
  attention and attention-mask interfaces the CPU attention kernel registers into, and encoder
  layers that return a tensor. 4.57 fails the model tests at the tokenizer.
* deepspeed 0.16: its checkpoints load under torch >= 2.6's ``weights_only`` default (0.15.4
  fails to resume a ZeRO-2 checkpoint there); 0.16.0 passes the engine and DeepSpeed-JSON tests
  (resume at every ZeRO stage), and its config models are pydantic 2, whose fields the
  DeepSpeed-JSON check reads.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

#: distribution name -> oldest supported version (also ``setup.py``'s ``>=`` bounds).
MINIMUMS: Dict[str, str] = {
    "torch": "2.4",
    "transformers": "5.0",
    "deepspeed": "0.16",
}

#: ``python_requires`` (``types.UnionType`` in the config loader needs 3.10).
PYTHON = "3.10"


def version_tuple(text: str) -> Tuple[int, ...]:
    """The leading release numbers of a version string: ``"2.13.0+cpu"`` -> ``(2, 13, 0)``.

    Pre-release and local suffixes are cut off, so ``2.4.0rc1`` counts as ``2.4.0``.
    """
    out: List[int] = []
    for part in text.split("+")[0].split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(out)


def too_old(installed: Dict[str, Optional[str]]) -> List[str]:
    """One message per package in ``installed`` (name -> version, None = not found) that is
    older than its minimum; packages that are not installed are left to the import error."""
    msgs = []
    for name, found in installed.items():
        need = MINIMUMS.get(name)
        if need is None or found is None:
            continue
        if version_tuple(found) < version_tuple(need):
            msgs.append(f"{name} {found} is installed but mitkd-toolkit needs {name}>={need}: "
                        f"pip install -U '{name}>={need}'")
    return msgs


def check_installed() -> None:
    """Raise ImportError naming every core library older than :data:`MINIMUMS`."""
    from importlib.metadata import PackageNotFoundError, version

    found: Dict[str, Optional[str]] = {}
    for name in MINIMUMS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    msgs = too_old(found)
    if msgs:
        raise ImportError("; ".join(msgs))
