"""Every benchmark script answers ``--help``: argparse formats help strings with ``%``, so a
literal ``%`` in one (``'MFU % (paired)'``) crashes ``--help`` with a traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))

# One interpreter for all scripts (torch is imported once): each runs as __main__ with
# ``--help`` and must end in SystemExit(0) after printing its usage.
_RUNNER = r"""
import contextlib, io, json, runpy, sys
out = {}
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(name, run_name="__main__")
        out[name] = "returned without exiting"
    except SystemExit as e:
        out[name] = "ok" if e.code in (0, None) and "usage:" in buf.getvalue() else f"exit {e.code!r}"
    except Exception as e:  # the bug this test guards against: a traceback instead of help
        out[name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_every_benchmark_script_prints_help():
    assert len(SCRIPTS) >= 7 and "bench_distill_step.py" in SCRIPTS, SCRIPTS
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *SCRIPTS], cwd=ROOT / "benchmarks", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(results) == set(SCRIPTS)
    bad = {k: v for k, v in results.items() if v != "ok"}
    assert not bad, bad
