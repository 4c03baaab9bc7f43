"""Small helpers shared by the recipes (no training logic of their own)."""
from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from toolkit.errors import ConfigError
from toolkit.resources import ds_config_dir, find_shipped, shipped_names


def auto_ds_config() -> str:
    """The shipped DeepSpeed JSON for this machine: bf16 (or fp16) ZeRO-2 on GPUs, fp32 on CPUs."""
    if torch.cuda.is_available():
        from toolkit.engine.precision import native_bf16_supported

        # Native only: torch's default also counts emulated bf16 (V100, T4), which is slow there.
        return "zero2_bf16.json" if native_bf16_supported("cuda") else "zero2_fp16.json"
    return "cpu_fp32.json"


def resolve_ds_config(path: Union[str, Path, None], default: str = "auto") -> Path:
    """A DeepSpeed JSON path: as given, else a shipped one by name (``zero2_bf16.json`` or
    ``zero2_bf16``), from the checkout's ``ds_configs/`` or the installed package's copy.

    ``auto`` (the jobs' default) picks :func:`auto_ds_config`.
    """
    if path is None or str(path) == "":
        path = default
    if str(path) == "auto":
        path = auto_ds_config()
    folder = ds_config_dir()
    found = find_shipped(path, folder, ".json")
    if found is not None:
        return found
    shipped = ", ".join(shipped_names(folder, "*.json")) or "none"
    raise ConfigError("ds_config", f"file not found: {path} (a path, or a shipped name: {shipped})")


def write_json(path: Union[str, Path], obj: Any) -> None:
    """Write JSON atomically and durably (fsynced tmp file + rename): readers never see half a file."""
    from toolkit.utils.fsio import write_json_atomic

    write_json_atomic(path, obj, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def forward_kwargs(fn: Any, batch: Dict[str, Any]) -> Dict[str, Any]:
    """Keep the batch entries that ``fn`` accepts (collate may carry decode metadata)."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return {k: v for k, v in batch.items() if k in params and isinstance(v, torch.Tensor)}


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def count_tokens(batch: Dict[str, Any]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum().item()) if isinstance(mask, torch.Tensor) else 0


def batch_size_of(batch: Dict[str, Any]) -> int:
    ids = batch["input_ids"]
    return int(ids.shape[0])


def shard_indices(n: int, rank: int, world_size: int) -> List[int]:
    """Rank ``rank``'s share of ``range(n)``, strided so shards differ by at most one."""
    return list(range(rank, n, world_size))


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return m, 0.0
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var)


def flatten_metrics(metrics: Dict[str, Any], prefix: str = "") -> Dict[str, float]:
    out: Dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flatten_metrics(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = float(v)
    return out


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{int(n)}"
        n /= 1000.0
    return f"{n:.1f}T"


def iter_chunks(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i: i + size]


def optional_path(p: Optional[str]) -> Optional[Path]:
    return Path(p) if p else None


def task_ref(task: Any) -> str:
    """What reloads ``task`` with ``get_task``: its YAML path for custom tasks, else its name."""
    spec = getattr(task, "spec", None)
    if spec is not None and getattr(spec, "source", None):
        return str(spec.source)
    return task.name


def example_texts(example: Any) -> List[str]:
    """The raw texts of an example of any family (for tokenizer coverage checks)."""
    out = []
    for attr in ("text_a", "text_b", "question", "context"):
        v = getattr(example, attr, None)
        if isinstance(v, str) and v:
            out.append(v)
    toks = getattr(example, "tokens", None)
    if toks:
        out.append(" ".join(toks))
    for c in getattr(example, "choices", None) or []:
        out.append(c)
    return out


def unknown_token_rate(tokenizer: Any, examples: Sequence[Any], sample: int = 200) -> float:
    """Share of [UNK] among the tokens of the first ``sample`` examples."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return 0.0
    total = n_unk = 0
    for ex in list(examples)[:sample]:
        for text in example_texts(ex):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            total += len(ids)
            n_unk += sum(1 for i in ids if i == unk)
    return n_unk / total if total else 0.0


def check_task_tokenizer(task: Any, examples: Sequence[Any], tokenizer: Any, model_dir: Any,
                         max_unk: float = 0.2) -> float:
    """Refuse a task whose text the model's vocabulary cannot represent (e.g. Chinese text
    with an English-only vocabulary): that run would train on [UNK] and mean nothing."""
    from toolkit.errors import DataError

    rate = unknown_token_rate(tokenizer, examples)
    if rate > max_unk:
        raise DataError(model_dir, f"the tokenizer maps {rate:.0%} of task '{task.name}' ({task.language}) tokens "
                        f"to [UNK]: the model's vocabulary does not match this task's language/text",
                        hint="use a model whose vocabulary covers the task (e.g. a Chinese vocab for CLUE)")
    return rate


def mean_across_ranks(sums: Dict[str, Any], n: int) -> Dict[str, float]:
    """Average logged values over every rank's micro batches (what a one-process run logs)."""
    from toolkit.engine import dist

    keys = sorted(sums)
    # Values may be device tensors (accumulated without a host sync per step): read them here.
    t = torch.tensor([float(sums[k]) for k in keys] + [float(n)], dtype=torch.float64)
    t = dist.all_reduce_sum(t)
    total = float(t[-1]) or 1.0
    return {k: float(v) / total for k, v in zip(keys, t[:-1].tolist())}


# -- early input checks: a refused job fails here, before any model loads ---------------------
def check_model_dir(field: str, path: Optional[str]) -> None:
    """``path`` (the config field ``field``) is a BERT/ERNIE ``save_pretrained`` folder; else a
    ConfigError naming the field, the folder and what is wrong with it."""
    from toolkit.errors import ToolkitError
    from toolkit.models.encoder import read_model_type

    if not path:
        raise ConfigError(field, "is required: give a model directory")
    try:
        read_model_type(path)
    except ToolkitError as e:
        raise ConfigError(field, str(e)) from None


def check_ds_config(path: Optional[str]) -> Dict[str, Any]:
    """The job's DeepSpeed JSON, read and checked for this world size (see ds_config.py)."""
    from toolkit.engine.ds_config import load_ds_config

    return load_ds_config(resolve_ds_config(path), int(os.environ.get("WORLD_SIZE", "1")))


def check_corpus(field: str, corpus: Any) -> None:
    """The corpus sources resolve to readable, non-empty shards (DataError naming the spec/file)."""
    from toolkit.data.sources import resolve_shards

    if not corpus.sources:
        raise ConfigError(f"{field}.sources", "no corpus given: list files, globs or hf: specs")
    resolve_shards(corpus.sources, corpus.format, corpus.strict)
