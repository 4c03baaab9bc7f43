"""What a pipeline stage depends on: its job config and fingerprints of its inputs (model
folders, task files, corpus shards). A finished stage records them in ``STAGE_COMPLETE.json``;
a re-run skips it while they are unchanged and says which one changed otherwise."""
from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence

from toolkit.errors import ToolkitError
from toolkit.utils.fingerprint import digest, path_fingerprint


def tasks_fingerprint(refs: Sequence[str], data_dir: Optional[str]) -> Dict[str, Any]:
    """Fingerprints of the files behind task references: a custom task's YAML and every split
    file that exists. A task that does not resolve is recorded as such (its job reports it)."""
    from toolkit.tasks import get_task

    out: Dict[str, Any] = {}
    for ref in refs:
        try:
            task = get_task(ref, data_dir)
        except ToolkitError as e:
            out[str(ref)] = {"unresolved": str(e)}
            continue
        files: Dict[str, Any] = {}
        source = getattr(getattr(task, "spec", None), "source", None)
        if source:
            files[str(source)] = path_fingerprint(source)
        for split in getattr(task, "splits", {}) or {}:
            if task.has_split(split):
                path = task.split_path(split)
                files[str(path)] = path_fingerprint(path)
        out[str(ref)] = files
    return out


def corpus_fingerprint(sources: Any) -> Dict[str, Any]:
    """Per corpus file, its size and head/tail hash (what the distillation's resume checks too)."""
    from toolkit.data.sources import resolve_shards
    from toolkit.utils.fingerprint import file_digest

    specs = [sources] if isinstance(sources, str) else list(sources or [])
    if not specs:
        return {}
    try:
        shards, _ = resolve_shards(specs)
    except ToolkitError as e:
        return {"unresolved": str(e)}
    return {s.name: ({} if s.kind == "hf" else file_digest(s.path)) for s in shards}


def job_inputs(job: str, d: Dict[str, Any]) -> Dict[str, Any]:
    """The inputs of a stage's job config whose change must re-run the stage."""
    data_dir = d.get("data_dir")
    out: Dict[str, Any] = {}
    if job in ("teacher", "eval", "finetune") and d.get("model"):
        out["model"] = path_fingerprint(d["model"])
    if job in ("teacher", "eval", "probe"):
        out["tasks"] = tasks_fingerprint(list(d.get("tasks") or []), data_dir)
    if job == "finetune" and d.get("task"):
        out["tasks"] = tasks_fingerprint([d["task"]], data_dir)
    if job == "probe":
        out["models"] = {k: path_fingerprint(v) for k, v in (d.get("models") or {}).items()}
    if job == "teacher":
        anchor = (d.get("anchor") or {}).get("corpus") or {}
        if anchor.get("sources"):
            out["anchor_corpus"] = corpus_fingerprint(anchor["sources"])
    if job == "distill":
        out["teacher"] = path_fingerprint(d["teacher"])
        if d.get("mix_teacher"):
            out["mix_teacher"] = path_fingerprint(d["mix_teacher"])
        student = d.get("student") or {}
        for key in ("init_from", "path"):
            if student.get(key):
                out[f"student.{key}"] = path_fingerprint(student[key])
        out["corpus"] = corpus_fingerprint((d.get("corpus") or {}).get("sources"))
    return out


def stage_identity(config: Dict[str, Any], inputs: Dict[str, Any]) -> Dict[str, Any]:
    """What a finished stage is checked against on a re-run: its config and its inputs."""
    plain = json.loads(json.dumps(config, default=str))
    return {"config": plain, "config_sha256": digest(plain), "inputs": inputs, "inputs_sha256": digest(inputs)}


def _flat(obj: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: Dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def identity_change(old: Optional[Dict[str, Any]], new: Dict[str, Any]) -> Optional[str]:
    """Why a stage recorded with identity ``old`` must run again for ``new``; None when it need not."""
    if not old:
        return "its record predates config and input tracking"
    if old.get("config_sha256") != new["config_sha256"]:
        a, b = _flat(old.get("config", {})), _flat(new["config"])
        changed = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
        shown = ", ".join(f"{k} ({a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r})" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        return f"its config changed: {shown}{more}" if changed else "its config changed"
    if old.get("inputs_sha256") != new["inputs_sha256"]:
        a, b = old.get("inputs", {}), new["inputs"]
        for key in sorted(set(a) | set(b)):
            if a.get(key) == b.get(key):
                continue
            fa, fb = _flat(a.get(key) or {}), _flat(b.get(key) or {})
            names = sorted({k.rsplit(".", 1)[0] if k.rsplit(".", 1)[-1] in _DIGEST_KEYS else k
                            for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)})
            detail = f" ({', '.join(names[:2])}{' ...' if len(names) > 2 else ''})" if names and names != [""] else ""
            return f"its input '{key}' changed{detail}"
        return "its inputs changed"
    return None


_DIGEST_KEYS = ("size", "sha256_head_tail", "published", "missing")
