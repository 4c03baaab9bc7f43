"""Architecture rules that a test can check (../shared/STYLE.md)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_model_loss_task_data_code_never_imports_deepspeed():
    bad = []
    for sub in ("models", "losses", "tasks", "data", "metrics"):
        for f in (ROOT / "toolkit" / sub).rglob("*.py"):
            text = f.read_text(encoding="utf-8")
            if re.search(r"^\s*(import|from)\s+(deepspeed|torch\.distributed)\b", text, re.M):
                bad.append(str(f.relative_to(ROOT)))
    assert not bad, f"only toolkit/engine may import deepspeed / torch.distributed: {bad}"


def test_tokenizers_folder_is_not_a_package():
    assert not (ROOT / "tokenizers" / "__init__.py").exists()


def test_configs_load_with_safe_loader():
    for f in (ROOT / "toolkit").rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        assert "yaml.load(" not in text and "FullLoader" not in text, f
