"""CPU allocator choice (toolkit/launch/allocator.py): resolution, environment, re-exec."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_env
from toolkit.errors import ToolkitError
from toolkit.launch import allocator as A

ROOT = Path(__file__).resolve().parents[2]


def _fake_libs(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / "lib"
    d.mkdir()
    for n in names:
        (d / n).write_bytes(b"\x7fELF")
    return d


def test_auto_prefers_tcmalloc_then_jemalloc_on_cpu_hosts(tmp_path):
    d = _fake_libs(tmp_path, "libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    assert A.resolve("auto", [d], gpu_host=False) == d / "libtcmalloc_minimal.so.4"
    (d / "libtcmalloc_minimal.so.4").unlink()
    assert A.resolve(None, [d], gpu_host=False) == d / "libjemalloc.so.2"
    (d / "libjemalloc.so.2").unlink()
    assert A.resolve("auto", [d], gpu_host=False) is None  # nothing installed: system malloc, no error


def test_auto_leaves_gpu_hosts_alone_but_explicit_choices_apply(tmp_path):
    d = _fake_libs(tmp_path, "libtcmalloc_minimal.so.4", "libjemalloc.so.2")
    assert A.resolve("auto", [d], gpu_host=True) is None
    assert A.resolve("tcmalloc", [d], gpu_host=True) == d / "libtcmalloc_minimal.so.4"
    assert A.resolve("jemalloc", [d], gpu_host=True) == d / "libjemalloc.so.2"
    assert A.resolve("system", [d], gpu_host=False) is None


def test_explicit_choice_that_is_missing_says_how_to_install(tmp_path):
    d = _fake_libs(tmp_path)
    with pytest.raises(ToolkitError, match=r"TOOLKIT_CPU_ALLOCATOR=jemalloc.*libjemalloc2.*=system"):
        A.resolve("jemalloc", [d])


def test_path_choice_and_bad_values(tmp_path):
    lib = tmp_path / "libmymalloc.so"
    lib.write_bytes(b"\x7fELF")
    assert A.resolve(str(lib), []) == lib.resolve()
    with pytest.raises(ToolkitError, match="not a file"):
        A.resolve(str(tmp_path / "missing.so"), [])
    with pytest.raises(ToolkitError, match=r"TOOLKIT_CPU_ALLOCATOR=fast: unknown value"):
        A.resolve("fast", [])


def test_preload_env_prepends_once_and_keeps_user_settings(tmp_path):
    tc = tmp_path / "libtcmalloc_minimal.so.4"
    env = A.preload_env(tc, {"LD_PRELOAD": "/opt/libfoo.so", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"})
    assert env["LD_PRELOAD"] == f"{tc}:/opt/libfoo.so"
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"          # the user's value wins
    assert env[A.ENV_ACTIVE] == str(tc)
    assert A.preload_env(tc, env)["LD_PRELOAD"] == env["LD_PRELOAD"]   # idempotent
    je = A.preload_env(tmp_path / "libjemalloc.so.2", {})
    assert "dirty_decay_ms:-1" in je["MALLOC_CONF"] and je["LD_PRELOAD"].endswith("libjemalloc.so.2")


def test_reexec_is_a_no_op_when_already_active_or_system(monkeypatch):
    calls = []
    monkeypatch.setattr(A.os, "execve", lambda *a: calls.append(a))
    A.reexec_with_allocator(env={A.ENV_ACTIVE: "/x/libtcmalloc.so.4"})
    A.reexec_with_allocator(env={"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"})
    A.reexec_with_allocator(env={A.ENV_CHOICE: "system"})
    assert calls == []


def test_reexec_runs_the_same_command_line_with_the_library(monkeypatch, tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"\x7fELF")
    calls = []
    monkeypatch.setattr(A.os, "execve", lambda *a: calls.append(a))
    A.reexec_with_allocator(argv=["python", "launchers/distill.py", "--config", "c.yaml"],
                            env={A.ENV_CHOICE: str(lib), "KEEP": "1"})
    (exe, argv, env), = calls
    assert exe == sys.executable and argv == ["python", "launchers/distill.py", "--config", "c.yaml"]
    assert env["LD_PRELOAD"] == str(lib.resolve()) and env["KEEP"] == "1" and env[A.ENV_ACTIVE]


_PROBE = ("import json, sys; sys.path.insert(0, {root!r}); from toolkit.launch import allocator as A; "
          "A.reexec_with_allocator(); print(json.dumps([A.in_use(), sys.argv[1:]]))")


@pytest.mark.parametrize("name", ["tcmalloc", "jemalloc"])
def test_real_reexec_preloads_the_installed_library(name):
    if A.find_library(name, A.search_dirs()) is None:
        pytest.skip(f"{name} is not installed here (.ci/run installs it); {A._INSTALL_HINT[name]}")
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=str(ROOT)), "arg1", "--flag"],
                         env=subprocess_env(**{A.ENV_CHOICE: name}), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [name, ["arg1", "--flag"]]


def test_real_reexec_system_choice_and_error_exit():
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=str(ROOT))],
                         env=subprocess_env(**{A.ENV_CHOICE: "system"}), capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout.strip().splitlines()[-1])[0] == "system"
    bad = subprocess.run([sys.executable, str(ROOT / "launchers" / "distill.py"), "--help"],
                         env=subprocess_env(**{A.ENV_CHOICE: "nonsense"}), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "TOOLKIT_CPU_ALLOCATOR=nonsense: unknown value" in bad.stderr
