"""N-best span decoding for extractive QA (SQuAD v1/v2, CMRC2018).

A long context is split into several windows (features). Each feature keeps the index of
its example and, per token, the ``(start, end)`` character offsets into the original
context, or None for tokens that are not context (question, special tokens, padding). The
answer text is sliced from the original context by these offsets, so the decoded answer keeps
the context's original spelling and works for character-level Chinese alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.tasks.base import SpanExample

Offset = Optional[Tuple[int, int]]


@dataclass
class SpanFeature:
    """Decoding metadata of one window.

    Attributes:
        example_index: index of the example in the split.
        offsets: per token ``(char_start, char_end)`` in the context, None for non-context tokens.
    """

    example_index: int
    offsets: List[Offset]


def _feature_fields(feature: Union[SpanFeature, Mapping[str, Any]]) -> Tuple[int, List[Offset]]:
    if isinstance(feature, Mapping):
        return int(feature["example_index"]), feature["offsets"]
    return feature.example_index, feature.offsets


def _as_rows(logits: Any) -> List[np.ndarray]:
    """Per-feature 1-D float arrays from a ``[F, L]`` array/tensor or a list of rows."""
    if hasattr(logits, "detach"):
        logits = logits.detach().float().cpu().numpy()
    if isinstance(logits, np.ndarray):
        return [np.asarray(r, dtype=np.float64) for r in logits]
    return [np.asarray(r.detach().float().cpu().numpy() if hasattr(r, "detach") else r, dtype=np.float64)
            for r in logits]


def postprocess_span_predictions(
    examples: Sequence[SpanExample],
    features: Sequence[Union[SpanFeature, Mapping[str, Any]]],
    start_logits: Any,
    end_logits: Any,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> Tuple[Dict[str, str], Dict[str, float]]:
    """Pick the best answer span of every example over all of its windows.

    Args:
        examples: the QA examples; ``guid`` is the question id.
        features: one per window, aligned with the logits rows.
        start_logits, end_logits: ``[F, L]`` (array/tensor, or F rows of possibly different L).
        n_best_size: start and end candidates tried per window (the top-n of each).
        max_answer_length: longest answer in tokens.
        version_2_with_negative: predict "" when the null score beats the best span by more
            than ``null_score_diff_threshold``.

    Returns:
        (predictions ``{qid: answer text}``, null_odds ``{qid: null score - best span score}``).
        The null score is ``start[0] + end[0]`` (the CLS token), the minimum over windows.
        With no valid span at all the prediction is "" and the null odds are +inf.
    """
    starts, ends = _as_rows(start_logits), _as_rows(end_logits)
    if not (len(starts) == len(ends) == len(features)):
        raise ToolkitError(f"span decoding got {len(features)} features but {len(starts)} start and "
                           f"{len(ends)} end logit rows; decode the logits of the same encoded split")
    by_example: List[List[int]] = [[] for _ in examples]
    for fi, feat in enumerate(features):
        ei, _ = _feature_fields(feat)
        if not 0 <= ei < len(examples):
            raise ToolkitError(f"span feature {fi} points at example {ei}, but there are {len(examples)}")
        by_example[ei].append(fi)

    predictions: Dict[str, str] = {}
    null_odds: Dict[str, float] = {}
    for ei, example in enumerate(examples):
        if example.guid in predictions:
            raise ToolkitError(f"duplicate question id {example.guid!r}; span predictions are keyed by id")
        best_score, best_text = -np.inf, ""
        null_score = np.inf
        for fi in by_example[ei]:
            _, offsets = _feature_fields(features[fi])
            s_log, e_log = starts[fi], ends[fi]
            n = min(len(offsets), len(s_log), len(e_log))
            null_score = min(null_score, float(s_log[0] + e_log[0]))
            # argsort over the window's real tokens only (dynamic padding may add more columns).
            top_s = np.argsort(s_log[:n])[::-1][:n_best_size]
            top_e = np.argsort(e_log[:n])[::-1][:n_best_size]
            for s in top_s:
                if offsets[s] is None:
                    continue
                for e in top_e:
                    if offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(s_log[s] + e_log[e])
                    if score > best_score:
                        best_score = score
                        best_text = example.context[offsets[s][0]:offsets[e][1]]
        diff = null_score - best_score if np.isfinite(best_score) else float("inf")
        null_odds[example.guid] = float(diff)
        if version_2_with_negative and diff > null_score_diff_threshold:
            predictions[example.guid] = ""
        else:
            predictions[example.guid] = best_text
    return predictions, null_odds
