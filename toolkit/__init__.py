"""MITKD toolkit: multi-task teacher, streaming task-agnostic distillation, fine-tuning and evaluation."""

__version__ = "0.1.0"
