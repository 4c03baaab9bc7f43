"""Registry behaviour seen from the English families: names, groups, close matches."""
from __future__ import annotations

import pytest

import toolkit.tasks as tasks
from toolkit.errors import ToolkitError
from toolkit.tasks import get_task, resolve_tasks, task_names


def test_english_tasks_registered():
    names = set(task_names())
    assert {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax",
            "squad", "squad_v1", "squad_v2"} <= names
    assert tasks.group_names()["glue"] == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    for cls_name in ("TextExample", "SpanExample", "TokenExample", "ChoiceExample", "register_task",
                     "register_group", "resolve_tasks", "get_task", "task_names"):
        assert hasattr(tasks, cls_name)


def test_unknown_task_lists_close_matches():
    with pytest.raises(ToolkitError, match=r"unknown task 'mrcp'\. Did you mean: mrpc"):
        get_task("mrcp")
    with pytest.raises(ToolkitError, match="Did you mean: .*squad_v2"):
        get_task("squad_v3")


def test_loose_names(assets_dir):
    assert get_task("STS-B").name == "stsb"
    assert get_task("SST_2").name == "sst2"
    assert get_task("MNLI").name == "mnli"


def test_resolve_mixes_names_groups_and_yaml(assets_dir):
    got = resolve_tasks(["rte", "glue", str(assets_dir / "custom" / "topic.yaml")], assets_dir / "glue")
    assert got[0].name == "rte" and len(got) == 10 and got[-1].name == "topic"
    with pytest.raises(ToolkitError, match="no tasks given"):
        resolve_tasks(" , ")
