"""MITKD toolkit: multi-task teacher, streaming task-agnostic distillation, fine-tuning and evaluation."""

from toolkit.requirements import check_installed as _check_installed

__version__ = "0.1.0"

# An older torch / transformers / deepspeed fails here, with a message naming the package and
# what to install, instead of deep inside a job (reads package metadata only: no torch import).
_check_installed()
