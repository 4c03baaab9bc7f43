"""Prediction over an encoded split, shared by fine-tuning, evaluation and the teacher recipe.

Every rank runs forward over its strided shard (so ZeRO-3, where a forward needs every rank,
works), the per-feature logits are gathered to all ranks, and the task's decoder turns them
into predictions in the task's own format.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from toolkit.engine import dist
from toolkit.recipes.common import forward_kwargs, shard_indices, to_device
from toolkit.tasks.features import collate, decode_predictions


def _pad_stack(items: List[torch.Tensor]) -> torch.Tensor:
    """Stack per-feature logits whose first dim (sequence length) may differ."""
    if all(t.shape == items[0].shape for t in items):
        return torch.stack(items)
    max_len = max(t.shape[0] for t in items)
    out = torch.full((len(items), max_len, *items[0].shape[1:]), -1e4, dtype=items[0].dtype)
    for i, t in enumerate(items):
        out[i, : t.shape[0]] = t
    return out


@torch.no_grad()
def predict_logits(forward: Callable[..., Any], module: torch.nn.Module, encoded: Any, task_name: str,
                   batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits for every feature of ``encoded``, in order, identical on every rank."""
    rank, world = dist.rank(), dist.world_size()
    idx = shard_indices(len(encoded), rank, world)
    loader = DataLoader(Subset(encoded, idx), batch_size=batch_size, shuffle=False, collate_fn=collate)
    was_training = module.training
    module.eval()
    mine: List[Tuple[int, torch.Tensor]] = []
    pos = 0
    # Under ZeRO-3 every rank must run the same number of forwards: pad short shards with a
    # repeat of their last batch, whose results are dropped.
    n_batches = (len(idx) + batch_size - 1) // batch_size
    max_batches = max(dist.all_gather_object(n_batches)) if world > 1 else n_batches
    batches = list(loader)
    # A rank whose shard is short (or empty: a dev set smaller than the world) repeats a batch
    # so every rank runs the same number of forwards; those results are dropped below.
    filler = batches[-1] if batches else (collate([encoded[0]]) if len(encoded) else None)
    for b in range(max_batches):
        batch = batches[b] if b < len(batches) else filler
        if batch is None:
            continue
        kw = forward_kwargs(module.forward, to_device(batch, device))
        kw.pop("labels", None)
        out = forward(task=task_name, **kw)
        if b >= len(batches):
            continue
        logits = out.logits.float().cpu()
        mask = batch.get("attention_mask")
        for j in range(logits.shape[0]):
            t = logits[j]
            # Span / token logits: keep only the real tokens of this feature.
            if t.dim() >= 1 and mask is not None and mask.dim() == 2 and t.shape[0] == mask.shape[1]:
                t = t[: int(mask[j].sum())]
            mine.append((idx[pos], t))
            pos += 1
    module.train(was_training)
    gathered = dist.all_gather_object(mine) if world > 1 else [mine]
    merged = sorted((p for part in gathered for p in part), key=lambda x: x[0])
    return _pad_stack([t for _, t in merged])


def predict(forward: Callable[..., Any], module: torch.nn.Module, task: Any, encoded: Any,
            batch_size: int, device: torch.device, **decode_kw: Any) -> Tuple[List[Any], Dict[str, Any]]:
    """Predictions in the task's format plus extras (e.g. SQuAD v2 null odds)."""
    logits = predict_logits(forward, module, encoded, task.name, batch_size, device)
    out = decode_predictions(task, encoded, logits, **decode_kw)
    if isinstance(out, tuple):
        preds, extra = out[0], (out[1] if len(out) > 1 else {})
        return list(preds), {"null_odds": extra} if extra is not None else {}
    return list(out), {}


def score_split(task: Any, examples: Sequence[Any], preds: Sequence[Any], extra: Dict[str, Any],
                suffix: str = "") -> Dict[str, float]:
    """Official metrics of ``task`` with ``suffix`` appended to every key.

    SQuAD v2.0 gets the no-answer probabilities that ``na_prob.json`` holds, so the scores
    equal the official script's on the written files.
    """
    if extra.get("null_odds") is not None and getattr(task, "version_2_with_negative", False):
        from toolkit.tasks.squad import na_probabilities

        try:
            metrics = task.score(examples, preds, na_probs=na_probabilities(extra["null_odds"]))
        except TypeError:
            metrics = task.score(examples, preds)
    else:
        metrics = task.score(examples, preds)
    return {f"{k}{suffix}": float(v) for k, v in metrics.items()}
