"""The pipeline's report: ``report.md``, ``comparison.png``, ``curves.png`` (from ``results.json``).

Every number in the Markdown table is read from the same ``results`` dict that is written
to ``results.json``, so the two can't disagree.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from toolkit.recipes.common import human_count, write_json

LABELS = {"teacher": "Teacher (fine-tuned per task)", "mitkd": "MITKD student",
          "baseline": "Baseline student (plain teacher)"}


def measure_inference(model_dir: str, seq_length: int = 128, batch_size: int = 32, repeats: int = 3) -> Dict[str, float]:
    """Forward throughput of an encoder on random ids (samples/s, tokens/s), fp32 on CPU."""
    import torch

    from toolkit.models.encoder import build_encoder

    model = build_encoder(model_dir).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (batch_size, seq_length), generator=g)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(input_ids=ids, attention_mask=mask)
        dt = (time.perf_counter() - t0) / repeats
    return {"samples_per_s": batch_size / dt, "tokens_per_s": batch_size * seq_length / dt,
            "seq_length": seq_length, "batch_size": batch_size}


def _fmt(v: Optional[float], std: Optional[float] = None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f} ± {std:.2f}" if std is not None else f"{v:.2f}"


def render_markdown(res: Dict[str, Any]) -> str:
    models = list(res["results"])
    settings = list(res["results"][models[0]])
    tasks = list(res["results"][models[0]][settings[0]]["tasks"])
    lines = [f"# MITKD pipeline report ({res['language']}, preset `{res['preset']}`)", ""]
    lines.append(f"Teacher: `{res['teacher']}`.")
    if res.get("teacher_note"):
        lines.append(f"**Note on the teacher:** {res['teacher_note']}")
    lines += ["", f"In-domain tasks (seen by the multi-task teacher): {', '.join(res['in_domain_tasks'])}.  ",
              f"Out-of-domain tasks (never seen by the teacher): {', '.join(res['out_of_domain_tasks']) or 'none'}.  ",
              f"Seeds: {res['seeds']}; scores are dev-set main metrics in percent, mean ± std over seeds.  ",
              f"Low-resource setting: each train split cut to {res['low_resource_examples']} examples.", ""]
    # Verdict first: a reader should see at a glance whether MITKD helped.
    lines += ["## Verdict", ""]
    for setting in settings:
        m = res["results"].get("mitkd", {}).get(setting)
        b = res["results"].get("baseline", {}).get(setting)
        if not m or not b:
            continue
        for key, label in (("in_domain_avg", "in-domain"), ("out_of_domain_avg", "out-of-domain"),
                           ("average", "all tasks")):
            if m.get(key) is None or b.get(key) is None:
                continue
            d = m[key] - b[key]
            word = "better" if d > 0 else ("worse" if d < 0 else "equal")
            lines.append(f"- {setting}, {label}: MITKD {m[key]:.2f} vs baseline {b[key]:.2f} "
                         f"(**{d:+.2f}**, MITKD {word})")
    lines += ["", "These are small-scale CPU numbers and are reported as measured; spreads over seeds show how "
              "much of a difference is noise.", ""]
    for setting in settings:
        lines += [f"## Scores: {setting.replace('_', '-')}", "",
                  "| model | " + " | ".join(f"{t} ({res['results'][models[0]][setting]['tasks'][t]['domain']})"
                                            for t in tasks) + " | in-domain avg | out-of-domain avg | avg |",
                  "|---|" + "---|" * (len(tasks) + 3)]
        for m in models:
            r = res["results"][m][setting]
            cells = [_fmt(r["tasks"][t]["score"], r["tasks"][t]["std"]) for t in tasks]
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) +
                         f" | {_fmt(r['in_domain_avg'])} | {_fmt(r['out_of_domain_avg'])} | {_fmt(r['average'])} |")
        lines.append("")
    lines += ["## Models", "", "| model | layers | hidden | heads | parameters | inference samples/s (seq 128, "
              "batch 32, CPU fp32) | training throughput |", "|---|---|---|---|---|---|---|"]
    for name, info in res["models"].items():
        inf = info.get("inference") or {}
        tr = info.get("train_throughput") or {}
        tr_s = f"{tr.get('tokens_per_s', 0):.0f} tok/s, {tr.get('samples_per_s', 0):.1f} samples/s" if tr else "–"
        lines.append(f"| {LABELS.get(name, 'Multi-task teacher' if name == 'mt_teacher' else name)} | "
                     f"{info.get('num_hidden_layers', '–')} | {info.get('hidden_size', '–')} | "
                     f"{info.get('num_attention_heads', '–')} | {human_count(info.get('params', 0))} | "
                     f"{inf.get('samples_per_s', 0):.1f} | {tr_s} |")
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in res.get("stage_seconds", {}).items()]
    lines += ["", "![comparison](comparison.png)", "", "![training curves](curves.png)", "",
              "All numbers above are in `results.json`.", ""]
    return "\n".join(lines)


def _plot_comparison(res: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(res["results"])
    settings = list(res["results"][models[0]])
    fig, axes = plt.subplots(1, len(settings), figsize=(6 * len(settings), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        tasks = list(res["results"][models[0]][setting]["tasks"])
        groups = tasks + ["in-dom avg", "out-dom avg"]
        width = 0.8 / len(models)
        for i, m in enumerate(models):
            r = res["results"][m][setting]
            vals = [r["tasks"][t]["score"] for t in tasks] + [r["in_domain_avg"] or 0, r["out_of_domain_avg"] or 0]
            errs = [r["tasks"][t]["std"] for t in tasks] + [0, 0]
            xs = [j + i * width for j in range(len(groups))]
            ax.bar(xs, vals, width, yerr=errs, label=LABELS.get(m, m), capsize=2)
        ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(groups))])
        ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
        ax.set_title(setting.replace("_", "-"))
        ax.set_ylabel("dev score (%)")
        lo = min(r for m in models for r in [res["results"][m][setting]["average"]])
        ax.set_ylim(max(0, lo - 25), 100)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _plot_curves(out_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    t = [r for r in _read_jsonl(out_dir / "teacher" / "job" / "metrics.jsonl") if r.get("prefix") == "train"]
    if t:
        axes[0].plot([r["step"] for r in t], [r["loss"] for r in t], label="multi-task teacher")
    axes[0].set_title("teacher: multi-task training loss")
    axes[0].set_xlabel("step")
    for stage, label in (("mitkd", "MITKD (multi-task teacher)"), ("baseline", "baseline (plain teacher)")):
        rows = [r for r in _read_jsonl(out_dir / stage / "job" / "metrics.jsonl")
                if r.get("prefix") == "train" and "loss" in r]
        if rows:
            axes[1].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
    axes[1].set_title("distillation: MiniLMv2 relation loss")
    axes[1].set_xlabel("step")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, results: Dict[str, Any]) -> None:
    """Measure inference speed of each model, then write results.json, report.md and the PNGs."""
    for name, info in results["models"].items():
        if info.get("inference") is None and Path(info["path"]).is_dir():
            try:
                info["inference"] = measure_inference(info["path"])
            except Exception as e:  # noqa: BLE001 - a speed probe must not lose the report
                info["inference"] = {"error": str(e)}
    write_json(out_dir / "results.json", results)
    (out_dir / "report.md").write_text(render_markdown(results), encoding="utf-8")
    _plot_comparison(results, out_dir / "comparison.png")
    _plot_curves(out_dir, out_dir / "curves.png")
