"""``toolkit probe``: how general is an encoder? Linear probes on frozen features.

For each task and each encoder, the encoder is frozen, every train and dev example is encoded
once (mean of the chosen layer's hidden states over the real tokens; per token for token
tasks), and a linear model is fitted on the train features: multinomial logistic regression
(L-BFGS) for classification, ridge regression for regression, per-token logistic regression
for token classification. Its L2 strength is picked on a held-out fifth of train, then the
model is refitted on all of train and scored on dev with the task's own metric. Every encoder
gets the same features pipeline, the same grid and the same seed, so the scores compare.

The MITKD pipeline uses it as the teacher generality check: it probes the pretrained teacher
(the reference) and the multi-task teacher on the out-of-domain tasks, and reports the drop
(``forgetting``) per task; a drop above ``threshold`` points is flagged. Multiple-choice and
span tasks are not probed (they have no single feature vector per label).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from toolkit.config import arg, save_config
from toolkit.errors import ConfigError, DataError
from toolkit.models.capture import resolve_layer
from toolkit.models.encoder import build_encoder, load_tokenizer
from toolkit.recipes.common import check_model_dir, write_json
from toolkit.tasks import resolve_tasks
from toolkit.tasks.base import CLASSIFICATION, REGRESSION, TOKEN_CLASSIFICATION
from toolkit.tasks.features import collate, encode_examples
from toolkit.utils.fsio import write_text_atomic
from toolkit.utils.lock import locked_output
from toolkit.utils.logging import get_logger

log = get_logger(__name__)

PROBED_TYPES = (CLASSIFICATION, REGRESSION, TOKEN_CLASSIFICATION)
L2_GRID = (1e-3, 1e-2, 1e-1)


@dataclass
class ProbeConfig:
    models: Dict[str, str] = arg(help="name -> encoder directory; the first is the reference the others are "
                                 "compared with (e.g. {pretrained: DIR, multitask: DIR})", factory=dict)
    tasks: List[str] = arg(help="task names or custom task YAML paths", factory=list)
    data_dir: Optional[str] = arg(None, "data root holding the official task folders")
    output_dir: str = arg("runs/probe", "where results.json and results.md go")
    layer: int = arg(0, "1-based layer whose hidden states are the features (0 = the last)")
    max_seq_length: int = arg(128, "tokens per sequence")
    train_limit: int = arg(1000, "train examples per task (seeded sample; 0 = all)")
    batch_size: int = arg(64, "encoding batch size")
    threshold: float = arg(2.0, "flag a model whose score is this many points below the reference's on a task")
    seed: int = arg(0, "seed of the train sample and the held-out fifth")

    def __post_init__(self) -> None:
        if len(self.models) < 1:
            raise ConfigError("models", "give at least one encoder (name: directory)")
        if not self.tasks:
            raise ConfigError("tasks", "give at least one task")
        if self.train_limit < 0:
            raise ConfigError("train_limit", "must be >= 0")
        if self.threshold < 0:
            raise ConfigError("threshold", "must be >= 0")


@torch.no_grad()
def encode_features(model: torch.nn.Module, encoded: Any, layer: int, per_token: bool,
                    batch_size: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Frozen features of an encoded split: ``[N, H]`` (mean over real tokens) or, per token,
    ``[T, H]`` with the ``[T]`` labels of the labeled tokens."""
    feats, labels = [], []
    for start in range(0, len(encoded), batch_size):
        batch = collate([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))])
        kw = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        out = model(**kw, output_hidden_states=True)
        h = out.hidden_states[layer + 1].float()                        # [B, L, H]
        mask = batch["attention_mask"].bool()
        if per_token:
            lab = batch["labels"]
            keep = lab != -100
            feats.append(h[keep].numpy())
            labels.append(lab[keep].numpy())
        else:
            m = mask.unsqueeze(-1).float()
            feats.append(((h * m).sum(1) / m.sum(1).clamp_min(1.0)).numpy())
    x = np.concatenate(feats) if feats else np.zeros((0, 1), np.float32)
    return x, (np.concatenate(labels) if per_token else None)


def _standardize(train: np.ndarray, *others: np.ndarray) -> List[np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(a - mu) / sd for a in (train, *others)]


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, steps: int = 100) -> torch.Tensor:
    """Weights ``[H + 1, C]`` of a multinomial logistic regression with an L2 penalty (L-BFGS)."""
    xt = torch.from_numpy(np.concatenate([x, np.ones((len(x), 1), x.dtype)], 1)).double()
    yt = torch.from_numpy(y).long()
    w = torch.zeros(xt.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w, yt) + 0.5 * l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return w.detach()


def predict_logistic(w: torch.Tensor, x: np.ndarray) -> np.ndarray:
    xt = torch.from_numpy(np.concatenate([x, np.ones((len(x), 1), x.dtype)], 1)).double()
    return (xt @ w).argmax(1).numpy()


def fit_ridge(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    xa = np.concatenate([x, np.ones((len(x), 1))], 1).astype(np.float64)
    reg = l2 * len(x) * np.eye(xa.shape[1])
    reg[-1, -1] = 0.0
    return np.linalg.solve(xa.T @ xa + reg, xa.T @ y.astype(np.float64))


def predict_ridge(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.ones((len(x), 1))], 1) @ w


class ProbeRecipe:
    def __init__(self, cfg: ProbeConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    def _split(self, task: Any, split: str) -> List[Any]:
        ex = task.load(split)
        if not ex:
            raise DataError(task.split_path(split), f"task '{task.name}' has an empty {split} split")
        return ex

    def _probe_task(self, task: Any, train: Sequence[Any], dev: Sequence[Any], model: torch.nn.Module,
                    tokenizer: Any) -> float:
        cfg = self.cfg
        n_layers = model.config.num_hidden_layers
        layer = resolve_layer(cfg.layer or n_layers, n_layers, "layer")
        per_token = task.task_type == TOKEN_CLASSIFICATION
        enc_tr = encode_examples(task, train, tokenizer, max_seq_length=cfg.max_seq_length)
        enc_dev = encode_examples(task, dev, tokenizer, max_seq_length=cfg.max_seq_length)
        x_tr, y_tok = encode_features(model, enc_tr, layer, per_token, cfg.batch_size)
        x_dev, y_dev_tok = encode_features(model, enc_dev, layer, per_token, cfg.batch_size)
        if per_token:
            y_tr = y_tok
        else:   # the encoded label: a class id, or the regression target
            y_tr = np.asarray([enc_tr[i]["labels"].item() for i in range(len(enc_tr))])
        x_tr, x_dev = _standardize(x_tr, x_dev)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # the fits are tiny: more threads only add synchronisation
        try:
            return self._fit_and_score(task, dev, x_tr, y_tr, x_dev, y_dev_tok, per_token)
        finally:
            torch.set_num_threads(threads)

    def _fit_and_score(self, task: Any, dev: Sequence[Any], x_tr: np.ndarray, y_tr: np.ndarray, x_dev: np.ndarray,
                       y_dev_tok: Optional[np.ndarray], per_token: bool) -> float:
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(x_tr))
        cut = max(1, len(order) // 5)
        hold, fit = order[:cut], order[cut:]
        best_l2, best = L2_GRID[0], -math.inf
        for l2 in L2_GRID:   # pick the L2 strength on a held-out fifth of train
            if task.task_type == REGRESSION:
                w = fit_ridge(x_tr[fit], y_tr[fit], l2)
                err = -float(np.mean((predict_ridge(w, x_tr[hold]) - y_tr[hold]) ** 2))
            else:
                w = fit_logistic(x_tr[fit], y_tr[fit], task.num_labels, l2)
                err = float(np.mean(predict_logistic(w, x_tr[hold]) == y_tr[hold]))
            if err > best:
                best, best_l2 = err, l2
        if task.task_type == REGRESSION:
            preds = [float(v) for v in predict_ridge(fit_ridge(x_tr, y_tr, best_l2), x_dev)]
            return float(task.score(dev, preds)[task.main_metric])
        w = fit_logistic(x_tr, y_tr, task.num_labels, best_l2)
        pred_ids = predict_logistic(w, x_dev)
        if per_token:   # accuracy over the labeled first-subword tokens
            return 100.0 * float(np.mean(pred_ids == y_dev_tok))
        preds = [task.labels[i] for i in pred_ids]
        return float(task.score(dev, preds)[task.main_metric])

    def run(self) -> Dict[str, Any]:
        with locked_output(self.out, "probe"):
            return self._run()

    def _run(self) -> Dict[str, Any]:
        cfg = self.cfg
        t0 = time.time()
        for name, path in cfg.models.items():
            check_model_dir(f"models.{name}", path)
        tasks = [t for t in resolve_tasks(cfg.tasks, cfg.data_dir)]
        skipped = [t.name for t in tasks if t.task_type not in PROBED_TYPES]
        tasks = [t for t in tasks if t.task_type in PROBED_TYPES]
        data = {}
        for task in tasks:
            train = self._split(task, "train")
            if cfg.train_limit and len(train) > cfg.train_limit:
                idx = np.random.default_rng(cfg.seed).permutation(len(train))[: cfg.train_limit]
                train = [train[i] for i in sorted(idx)]
            data[task.name] = (task, train, self._split(task, "dev"))
        scores: Dict[str, Dict[str, float]] = {}
        torch.manual_seed(cfg.seed)
        for name, path in cfg.models.items():
            model = build_encoder(path).eval()
            tokenizer = load_tokenizer(path)
            scores[name] = {}
            for tname, (task, train, dev) in data.items():
                scores[name][tname] = self._probe_task(task, train, dev, model, tokenizer)
                log.info("probe: %s on %s: %s %.2f", name, tname, task.main_metric, scores[name][tname])
            del model
        ref = next(iter(cfg.models))
        forgetting: Dict[str, Dict[str, float]] = {}
        flagged: List[Dict[str, Any]] = []
        for name in list(cfg.models)[1:]:
            forgetting[name] = {t: scores[ref][t] - scores[name][t] for t in data}
            for t, drop in forgetting[name].items():
                if drop > cfg.threshold:
                    flagged.append({"model": name, "task": t, "drop": drop})
                    log.warning("probe: %s is %.2f points below %s on %s (threshold %.1f): it has lost general "
                                "features there", name, drop, ref, t, cfg.threshold)
        result = {"reference": ref, "models": dict(cfg.models), "scores": scores, "forgetting": forgetting,
                  "flagged": flagged, "threshold": cfg.threshold, "skipped_tasks": skipped,
                  "metrics": {t: data[t][0].main_metric for t in data}, "seconds": time.time() - t0}
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / "config.json")
        write_text_atomic(self.out / "results.md", render_probe(result))
        write_json(self.out / "results.json", result)   # last: the record of a finished run
        return result


def render_probe(res: Dict[str, Any]) -> str:
    """A Markdown table: one row per task, the models' probe scores and each one's drop."""
    models = list(res["scores"])
    ref = res["reference"]
    head = "| task | metric | " + " | ".join(models) + "".join(f" | {m} - {ref}" for m in models[1:]) + " |"
    lines = [head, "|---|---|" + "---|" * (len(models) + len(models) - 1)]
    for t, metric in res["metrics"].items():
        cells = [f"{res['scores'][m][t]:.2f}" for m in models]
        for m in models[1:]:
            drop = res["forgetting"][m][t]
            cells.append(f"{0.0 - drop:+.2f}" + (" **(forgetting)**" if drop > res["threshold"] else ""))
        lines.append(f"| {t} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_probe(cfg: ProbeConfig) -> Dict[str, Any]:
    return ProbeRecipe(cfg).run()
