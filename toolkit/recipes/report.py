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
from toolkit.utils.fsio import replacing, write_text_atomic

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


def _verdict_word(d: float, noise: float) -> str:
    if abs(d) <= noise:
        return "within seed noise"
    return "MITKD better" if d > 0 else "MITKD worse"


def verdict_lines(res: Dict[str, Any]) -> List[str]:
    """One line per setting and domain: MITKD against the baseline, with the seed noise."""
    from toolkit.recipes.pipeline import noise

    lines = []
    for setting in res["results"].get("mitkd", {}):
        m, b = res["results"]["mitkd"][setting], res["results"]["baseline"][setting]
        for key, label in (("in_domain", "in-domain"), ("out_of_domain", "out-of-domain"), ("all", "all tasks")):
            if m.get(f"{key}_avg") is None or b.get(f"{key}_avg") is None:
                continue
            d = m[f"{key}_avg"] - b[f"{key}_avg"]
            nz = noise(m.get(f"{key}_std"), b.get(f"{key}_std"))
            lines.append(f"- {setting.replace('_', '-')}, {label}: MITKD {_fmt(m[f'{key}_avg'], m.get(f'{key}_std'))} "
                         f"vs baseline {_fmt(b[f'{key}_avg'], b.get(f'{key}_std'))} (**{d:+.2f}**, seed noise "
                         f"{nz:.2f}: {_verdict_word(d, nz)})")
    return lines


def losses_lines(res: Dict[str, Any]) -> List[str]:
    """The tasks where the MITKD student scores below the baseline by more than the seed noise."""
    from toolkit.recipes.pipeline import noise

    out = []
    for setting, m in res["results"].get("mitkd", {}).items():
        b = res["results"]["baseline"][setting]
        for t, r in m["tasks"].items():
            d = r["score"] - b["tasks"][t]["score"]
            if d < -noise(r["std"], b["tasks"][t]["std"]):
                out.append(f"- {setting.replace('_', '-')}, {t} ({r['domain']}-domain): {d:+.2f} "
                           f"({r['score']:.2f} against {b['tasks'][t]['score']:.2f})")
    return out


def render_markdown(res: Dict[str, Any]) -> str:
    models = list(res["results"])
    settings = list(res["results"][models[0]])
    tasks = list(res["results"][models[0]][settings[0]]["tasks"])
    lines = [f"# MITKD pipeline report ({res['language']}, preset `{res['preset']}`)", ""]
    lines.append(f"Teacher: `{res['teacher']}`.")
    if res.get("teacher_note"):
        lines.append(f"**Note on the teacher:** {res['teacher_note']}")
    spec = res.get("variant_spec") or {}
    lines += ["", f"In-domain tasks (seen by the multi-task teacher): {', '.join(res['in_domain_tasks'])}.  ",
              f"Out-of-domain tasks (never seen by the teacher): {', '.join(res['out_of_domain_tasks']) or 'none'}.  ",
              f"MITKD variant: `{res.get('variant', 'plain')}` ({json.dumps(spec) if spec else 'the paper recipe'}).  ",
              f"Seeds: {res['seeds']}; scores are dev-set main metrics in percent, mean ± std over seeds "
              f"(averages: the per-seed average over the tasks, then mean ± std over seeds).  ",
              f"Low-resource setting: each train split cut to {res['low_resource_examples']} examples.", ""]
    # Verdict first: a reader should see at a glance whether MITKD helped, and where it did not.
    lines += ["## Verdict", ""] + verdict_lines(res)
    losing = losses_lines(res)
    lines += ["", "**Where MITKD loses** (below the baseline by more than the seed noise): " +
              ("none." if not losing else ""), *losing]
    lines += ["", "These are small-scale CPU numbers and are reported as measured; spreads over seeds show how "
              "much of a difference is noise.", ""]
    lines += teacher_dev_lines(res.get("teacher_dev") or {})
    gen = res.get("teacher_generality")
    if gen:
        lines += ["## Teacher generality (linear probes)", "",
                  "Frozen features (mean of the last layer), a linear model fitted on each task's train split, "
                  "scored on dev. Forgetting = pretrained minus multi-task teacher; out-of-domain drops above "
                  f"{gen['threshold']:.1f} points are flagged.", "",
                  "| task | domain | metric | pretrained teacher | multi-task teacher | forgetting |",
                  "|---|---|---|---|---|---|"]
        for t, r in gen["tasks"].items():
            flag = " **flagged**" if t in gen["flagged"] else ""
            lines.append(f"| {t} | {r['domain']} | {r['metric']} | {r['pretrained']:.2f} | {r['multitask']:.2f} | "
                         f"{r['forgetting']:+.2f}{flag} |")
        mean = gen.get("mean_ood_forgetting")
        lines += ["", f"Mean out-of-domain forgetting: {mean:+.2f} points." if mean is not None else "",
                  (f"**Flagged:** {', '.join(gen['flagged'])}." if gen["flagged"] else "No task is flagged."), ""]
    for setting in settings:
        lines += [f"## Scores: {setting.replace('_', '-')}", "",
                  "| model | " + " | ".join(f"{t} ({res['results'][models[0]][setting]['tasks'][t]['domain']})"
                                            for t in tasks) + " | in-domain avg | out-of-domain avg | avg |",
                  "|---|" + "---|" * (len(tasks) + 3)]
        for m in models:
            r = res["results"][m][setting]
            cells = [_fmt(r["tasks"][t]["score"], r["tasks"][t]["std"]) for t in tasks]
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) +
                         f" | {_fmt(r['in_domain_avg'], r.get('in_domain_std'))} | "
                         f"{_fmt(r['out_of_domain_avg'], r.get('out_of_domain_std'))} | "
                         f"{_fmt(r['average'], r.get('all_std'))} |")
        rates = res.get("majority_rates") or {}
        if any(rates.get(t) is not None for t in tasks):
            lines.append("| Majority class (floor) | " + " | ".join(
                _fmt(rates.get(t)) for t in tasks) + " | | | |")
        lines.append("")
    lines += ["## Models", "", "| model | layers | hidden | heads | parameters | inference samples/s (seq 128, "
              "batch 32, CPU fp32) | training throughput | peak memory |", "|---|---|---|---|---|---|---|---|"]
    for name, info in res["models"].items():
        inf = info.get("inference") or {}
        tr = info.get("train_throughput") or {}
        tr_s = f"{tr.get('tokens_per_s', 0):.0f} tok/s, {tr.get('samples_per_s', 0):.1f} samples/s" if tr else "–"
        mem = f"{tr['peak_mem_mb']:.0f} MB" if tr.get("peak_mem_mb") else "–"
        lines.append(f"| {LABELS.get(name, 'Multi-task teacher' if name == 'mt_teacher' else name)} | "
                     f"{info.get('num_hidden_layers', '–')} | {info.get('hidden_size', '–')} | "
                     f"{info.get('num_attention_heads', '–')} | {human_count(info.get('params', 0))} | "
                     f"{inf.get('samples_per_s', 0):.1f} | {tr_s} | {mem} |")
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in res.get("stage_seconds", {}).items()]
    if res.get("ablation"):
        lines += ["", "The ablation behind the default variant is in `ablation.md`."]
    lines += ["", "![comparison](comparison.png)", "", "![training curves](curves.png)", "",
              "All numbers above are in `results.json`.", ""]
    return "\n".join(lines)


#: A multi-task teacher whose dev score is less than this many points above a task's
#: majority-class rate has not clearly learned the task (the report says so).
CLEAR_MARGIN = 5.0


def teacher_dev_lines(dev: Dict[str, Any]) -> List[str]:
    """The report's section on the multi-task teacher's own dev scores against each task's
    majority-class rate."""
    if not dev:
        return []
    lines = ["## Multi-task teacher on its tasks (dev)", "",
             "The teacher's dev score (main metric, at the kept step) against always predicting the most "
             "frequent train label.", "",
             "| task | metric | multi-task teacher | majority class | margin |", "|---|---|---|---|---|"]
    weak = []
    for t, r in dev.items():
        margin = r.get("margin")
        if margin is not None and margin < CLEAR_MARGIN:
            weak.append(t)
        lines.append(f"| {t} | {r['metric']} | {r['score']:.2f} | {_fmt(r.get('majority'))} | "
                     f"{'–' if margin is None else f'{margin:+.2f}'} |")
    margins = {t: r["margin"] for t, r in dev.items() if r.get("margin") is not None}
    lines.append("")
    if margins:
        low = min(margins, key=margins.get)
        lines.append(f"Smallest margin: {margins[low]:+.2f} points ({low}).")
    lines += [f"**Not clearly above the majority class** (margin under {CLEAR_MARGIN:.0f} points): "
              f"{', '.join(weak)}." if weak else
              f"Every task with a majority class is at least {CLEAR_MARGIN:.0f} points above it.", ""]
    return lines


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
            errs = [r["tasks"][t]["std"] for t in tasks] + [r.get("in_domain_std") or 0, r.get("out_of_domain_std") or 0]
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


def _plot_curves(out_dir: Path, path: Path, stages: Dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    t = [r for r in _read_jsonl(out_dir / stages["teacher"] / "job" / "metrics.jsonl") if r.get("prefix") == "train"]
    if t:
        axes[0].plot([r["step"] for r in t], [r["loss"] for r in t], label="multi-task teacher")
    axes[0].set_title("teacher: multi-task training loss")
    axes[0].set_xlabel("step")
    for stage, label in ((stages["mitkd"], "MITKD (multi-task teacher)"), ("baseline", "baseline (plain teacher)")):
        rows = [r for r in _read_jsonl(out_dir / stage / "job" / "metrics.jsonl")
                if r.get("prefix") == "train" and "loss" in r]
        if rows:
            axes[1].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
    axes[1].set_title("distillation loss")
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
    # Each file replaces its old version whole; results.json, the record of a finished run, last.
    write_text_atomic(out_dir / "report.md", render_markdown(results))
    with replacing(out_dir / "comparison.png") as tmp:
        _plot_comparison(results, tmp)
    with replacing(out_dir / "curves.png") as tmp:
        _plot_curves(out_dir, tmp, results.get("stages") or {"teacher": "teacher", "mitkd": "mitkd",
                                                              "baseline": "baseline"})
    write_json(out_dir / "results.json", results)


def ablation_rows(results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Per variant and setting: in-domain / out-of-domain averages (± seeds) and their differences
    to the shared baseline, the teacher's mean out-of-domain forgetting, and the recommendation:
    the variant best in-domain among those at least even with the baseline out of domain (within
    seed noise), on the full-data setting."""
    from toolkit.recipes.pipeline import noise

    rows: Dict[str, Any] = {}
    baseline = next(iter(results.values()))["results"]["baseline"]
    for name, res in results.items():
        m = res["results"]["mitkd"]
        row: Dict[str, Any] = {"settings": {}, "spec": res.get("variant_spec", {})}
        for setting, r in m.items():
            b = baseline[setting]
            cell = {}
            for key in ("in_domain", "out_of_domain", "all"):
                if r.get(f"{key}_avg") is None:
                    continue
                cell[key] = {"mitkd": r[f"{key}_avg"], "mitkd_std": r.get(f"{key}_std"),
                             "baseline": b[f"{key}_avg"], "baseline_std": b.get(f"{key}_std"),
                             "delta": r[f"{key}_avg"] - b[f"{key}_avg"],
                             "noise": noise(r.get(f"{key}_std"), b.get(f"{key}_std"))}
            row["settings"][setting] = cell
        gen = res.get("teacher_generality") or {}
        row["mean_ood_forgetting"] = gen.get("mean_ood_forgetting")
        rows[name] = row
    even = [n for n, r in rows.items() if "out_of_domain" in r["settings"].get("full", {})
            and r["settings"]["full"]["out_of_domain"]["delta"] >= -r["settings"]["full"]["out_of_domain"]["noise"]]
    best = max(even, key=lambda n: rows[n]["settings"]["full"]["in_domain"]["mitkd"]) if even else None
    return {"variants": rows, "recommended": best, "even_out_of_domain": even}


def write_ablation(out_dir: Path, results: Dict[str, Dict[str, Any]], jobs: Dict[str, Any]) -> Dict[str, Any]:
    """ablation.json, ablation.md and ablation.png for the variants of one pipeline run."""
    summary = ablation_rows(results)
    write_json(out_dir / "ablation.json", summary)
    first = next(iter(results.values()))
    lines = ["# MITKD variants against the baseline student", "",
             f"Same students, data and seeds ({first['seeds']}) for every variant; one baseline student "
             "(task-agnostic MiniLMv2 from the pretrained teacher). Cells: MITKD minus baseline, in points, with the "
             "seed noise sqrt(s_m^2 + s_b^2) in brackets; the MITKD average (± std over seeds) follows.", "",
             "| variant | full in-domain | full out-of-domain | low-resource in-domain | low-resource out-of-domain | "
             "teacher forgetting (probe, OOD mean) |", "|---|---|---|---|---|---|"]
    for name, row in summary["variants"].items():
        cells = []
        for setting in ("full", "low_resource"):
            for key in ("in_domain", "out_of_domain"):
                c = row["settings"].get(setting, {}).get(key)
                cells.append("–" if c is None else f"{c['delta']:+.2f} [{c['noise']:.2f}] "
                             f"({c['mitkd']:.2f} ± {c['mitkd_std'] or 0:.2f})")
        f = row["mean_ood_forgetting"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'–' if f is None else f'{f:+.2f}'} |")
    b = first["results"]["baseline"]
    lines += ["", "Baseline student: " + "; ".join(
        f"{s.replace('_', '-')} in-domain {_fmt(b[s]['in_domain_avg'], b[s].get('in_domain_std'))}, "
        f"out-of-domain {_fmt(b[s]['out_of_domain_avg'], b[s].get('out_of_domain_std'))}" for s in b) + ".", ""]
    rec = summary["recommended"]
    lines.append(f"**Recommended:** `{rec}`: the best in-domain of the variants at least even with the baseline "
                 f"out of domain within seed noise ({', '.join(summary['even_out_of_domain'])})." if rec else
                 "**No variant** is even with the baseline out of domain within seed noise.")
    lines += ["", "Variants:", ""] + [f"- `{n}`: {json.dumps(r['spec']) if r['spec'] else 'MITKD as in the paper'}"
                                       for n, r in summary["variants"].items()]
    lines += ["", "![ablation](ablation.png)", ""]
    write_text_atomic(out_dir / "ablation.md", "\n".join(lines))
    with replacing(out_dir / "ablation.png") as tmp:
        _plot_ablation(summary, tmp)
    return summary


def _plot_ablation(summary: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    groups = [("full", "in_domain"), ("full", "out_of_domain"), ("low_resource", "in_domain"),
              ("low_resource", "out_of_domain")]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups) * max(1, len(names)) / 3, 4))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        vals, errs = [], []
        for s, k in groups:
            c = summary["variants"][n]["settings"].get(s, {}).get(k)
            vals.append(c["delta"] if c else 0.0)
            errs.append(c["noise"] if c else 0.0)
        ax.bar([j + i * width for j in range(len(groups))], vals, width, yerr=errs, capsize=2, label=n)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{s.replace('_', '-')}\n{k.replace('_', '-')}" for s, k in groups], fontsize=8)
    ax.set_ylabel("MITKD minus baseline (points)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
