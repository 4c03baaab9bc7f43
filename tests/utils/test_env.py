"""Environment on/off switches (toolkit/utils/env.py): off values, on values, and a typo that
names the variable instead of silently doing either."""
from __future__ import annotations

import pytest

from toolkit.errors import ConfigError
from toolkit.utils.env import switched_off


@pytest.mark.parametrize("value", ["0", "false", "OFF", " no "])
def test_off_values_name_the_variable(monkeypatch, value):
    monkeypatch.setenv("TOOLKIT_X", value)
    assert switched_off("TOOLKIT_X") == f"TOOLKIT_X={value.strip().lower()}"


@pytest.mark.parametrize("value", [None, "", "1", "true", "ON", "auto"])
def test_unset_or_on_values_keep_it_on(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("TOOLKIT_X", raising=False)
    else:
        monkeypatch.setenv("TOOLKIT_X", value)
    assert switched_off("TOOLKIT_X") is None


def test_a_typo_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("TOOLKIT_X", "disable")
    with pytest.raises(ConfigError, match=r"TOOLKIT_X.*'disable'.*0, false, off, no"):
        switched_off("TOOLKIT_X")


def test_the_fast_paths_refuse_a_malformed_switch(monkeypatch):
    from toolkit.kernels import cpu_rows
    from toolkit.models.onednn import onednn_unavailable_reason

    monkeypatch.setenv("TOOLKIT_ONEDNN_LINEAR", "of")
    with pytest.raises(ConfigError, match="TOOLKIT_ONEDNN_LINEAR"):
        onednn_unavailable_reason()
    monkeypatch.setenv("TOOLKIT_CPU_KERNEL", "nope")
    with pytest.raises(ConfigError, match="TOOLKIT_CPU_KERNEL"):
        cpu_rows.load()
