"""Official metrics by name, all in percent (0-100).

``METRICS`` maps a metric name to ``fn(predictions, references)`` returning a float (keyed by
the metric name) or a dict of named scores (SQuAD). :func:`compute` runs several and merges
the results. Custom task YAML files name metrics from this registry.

| name | what |
|---|---|
| ``accuracy`` | exact label match; token accuracy for lists of tags |
| ``f1`` | F1 of the positive class ``1`` (GLUE MRPC / QQP) |
| ``macro_f1`` | mean per-class F1 |
| ``mcc`` | Matthews correlation (CoLA, AX) |
| ``pearson`` / ``spearman`` | correlations (STS-B) |
| ``seqeval_f1`` | entity-level micro F1 over BIO/BIOES tags |
| ``squad_v1`` / ``squad_v2`` | official SQuAD EM / F1 over aligned answer lists |
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Union

from toolkit.errors import ToolkitError
from toolkit.metrics.classification import (accuracy, f1_binary, get_entities, macro_f1, matthews_corr,
                                            pearson, seqeval_f1, spearman)
from toolkit.metrics.squad import normalize_answer, squad_v1, squad_v1_metric, squad_v2, squad_v2_metric

MetricFn = Callable[[Sequence[Any], Sequence[Any]], Union[float, Dict[str, float]]]

METRICS: Dict[str, MetricFn] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "macro_f1": macro_f1,
    "mcc": matthews_corr,
    "pearson": pearson,
    "spearman": spearman,
    "seqeval_f1": seqeval_f1,
    "squad_v1": squad_v1_metric,
    "squad_v2": squad_v2_metric,
}


def register_metric(name: str) -> Callable[[MetricFn], MetricFn]:
    """Decorator adding ``fn(preds, refs)`` to :data:`METRICS` under ``name``."""

    def deco(fn: MetricFn) -> MetricFn:
        if name in METRICS and METRICS[name] is not fn:
            raise ValueError(f"metric '{name}' registered twice")
        METRICS[name] = fn
        return fn

    return deco


def metric_names() -> list:
    return sorted(METRICS)


def compute(names: Union[str, Sequence[str]], preds: Sequence[Any], refs: Sequence[Any]) -> Dict[str, float]:
    """Run the named metrics and merge their results into one ``{name: percent}`` dict."""
    names = [names] if isinstance(names, str) else list(names)
    out: Dict[str, float] = {}
    for name in names:
        fn = METRICS.get(name)
        if fn is None:
            raise ToolkitError(f"unknown metric '{name}'; known metrics: {', '.join(metric_names())}")
        value = fn(preds, refs)
        if isinstance(value, dict):
            out.update({k: float(v) for k, v in value.items()})
        else:
            out[name] = float(value)
    return out


def _load_optional_families() -> None:
    """CMRC2018 metrics live in their own module (another family); register them if present."""
    try:
        import toolkit.metrics.cmrc  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "toolkit.metrics.cmrc":
            raise


_load_optional_families()

__all__ = ["METRICS", "accuracy", "compute", "f1_binary", "get_entities", "macro_f1", "matthews_corr",
           "metric_names", "normalize_answer", "pearson", "register_metric", "seqeval_f1", "spearman",
           "squad_v1", "squad_v2"]
