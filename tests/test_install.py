"""A plain (non-editable) install is complete: build an sdist, a wheel from it, install the wheel
into a fresh virtual environment outside the checkout, and run jobs from another folder.

The environment reuses the installed torch/deepspeed/transformers (``--system-site-packages``),
but the toolkit itself comes only from the wheel: the test checks that ``import toolkit``
resolves into the environment, not to the checkout or its editable install. ``slow``: CI runs
it on its own line (.ci/run).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import subprocess_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=600, check=True):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def _source_copy(dest: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files (what a clone would hold)."""
    try:
        files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"],
                               capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()
                 and not any(part in (".git", "runs", "build", "__pycache__") for part in p.parts)]
    for rel in files:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(python of the fresh environment, its bin folder, an env without the checkout on any path)."""
    root = tmp_path_factory.mktemp("install")
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    src = _source_copy(root / "src")
    # sdist first, then the wheel from the unpacked sdist: proves the sdist alone is complete.
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", root / "sdist"], src, env)
    sdist = next((root / "sdist").glob("*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "unpacked")
    unpacked = next((root / "unpacked").iterdir())
    _run([sys.executable, "-m", "pip", "wheel", unpacked, "--no-deps", "--no-build-isolation", "-q",
          "-w", root / "wheel"], root, env)
    wheel = next((root / "wheel").glob("mitkd_toolkit-*.whl"))
    _run([sys.executable, "-m", "venv", "--system-site-packages", root / "venv"], root, env)
    py = root / "venv" / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], root, env)
    work = root / "elsewhere"
    work.mkdir()
    return py, py.parent, env, work


def test_the_toolkit_comes_from_the_wheel(venv):
    py, _, env, work = venv
    out = _run([py, "-c", "import toolkit, toolkit.resources as r; print(toolkit.__file__); "
                          "print(r.ds_config_dir()); print(r.checkout_root())"], work, env).stdout.split()
    pkg, ds_dir, checkout = Path(out[0]), Path(out[1]), out[2]
    assert py.parent.parent in pkg.parents, f"toolkit imported from {pkg}, not the environment"
    assert ROOT not in pkg.parents and checkout == "None"
    assert ds_dir == pkg.parent / "shipped" / "ds_configs"
    shipped = {p.name for p in ds_dir.glob("*.json")}
    assert shipped == {p.name for p in (ROOT / "ds_configs").glob("*.json")}
    assert {p.name for p in (pkg.parent / "shipped" / "configs").glob("*.yaml")} == \
        {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert (pkg.parent / "shipped" / "configs" / "models" / "bert-large-uncased" / "config.json").is_file()


def test_help_plan_and_launch_commands_from_another_folder(venv):
    py, bindir, env, work = venv
    assert "plan" in _run([bindir / "toolkit", "--help"], work, env).stdout
    plan = _run([bindir / "toolkit", "plan", "distill", "--config", "distill_bert_large.yaml",
                 "--ds-config", "zero2_bf16.json", "teacher=bert-large-uncased", "--nodes", "2"], work, env).stdout
    assert "checks: passed" in plan and "24 layers" in plan and "global batch 128" in plan
    launch = _run([bindir / "toolkit", "launch", "distill", "--dry-run", "--num-gpus", "2", "--config",
                   "distill_bert_large.yaml", "--ds-config", "zero2_bf16.json"], work, env).stdout
    assert "--module toolkit.launchers.distill" in launch and str(ROOT) not in launch
    sbatch = _run([bindir / "toolkit", "slurm", "distill", "--dry-run", "--config", "distill_bert_large.yaml"],
                  work, env).stdout
    assert "PYTHONPATH" not in sbatch and str(ROOT) not in sbatch and "toolkit.launch.node" in sbatch
    usage = _run([py, "-m", "toolkit.launchers.distill", "--help"], work, env).stdout
    assert "--ds_config" in usage


def _distill_args(teacher: Path, corpus: Path, out: Path):
    return ["--config", "distill_bert_large.yaml", "--ds-config", "cpu_fp32.json", f"teacher={teacher}",
            f"output_dir={out}", f"corpus.sources={corpus / '*.txt'}", "corpus.seq_length=32", "corpus.num_workers=0",
            "corpus.shuffle_buffer=16", "student.num_layers=2", "student.hidden_size=32", "student.num_heads=4",
            "student.intermediate_size=64", "loss.options.minilmv2.num_relation_heads=8", "loss.teacher_layer=0", "max_steps=2",
            "save_every=0", "log_every=1"]


def test_a_short_distillation_from_another_folder(venv, tiny_bert_dir, fixture_corpus):
    """``toolkit distill`` with the shipped job YAML and ``--ds-config cpu_fp32.json`` by name."""
    py, bindir, env, work = venv
    out = work / "distill"
    args = _distill_args(tiny_bert_dir, fixture_corpus, out)
    proc = _run([bindir / "toolkit", "distill", *args], work, env)
    assert (out / "student" / "config.json").is_file(), proc.stderr[-3000:]
    assert "cpu_fp32.json" in (out / "config.json").read_text()


def test_the_launcher_module_under_deepspeed(venv, tiny_bert_dir, fixture_corpus):
    """``toolkit launch`` starts ``deepspeed --module toolkit.launchers.distill`` from the wheel."""
    py, bindir, env, work = venv
    out = work / "launched"
    # toolkit launch passes --ds_config to the module; the rest are key=value overrides.
    args = _distill_args(tiny_bert_dir, fixture_corpus, out)
    launch_args = ["--config", args[1], "--ds-config", args[3], *args[4:]]
    env = {**env, "OMP_NUM_THREADS": "1"}
    proc = _run([bindir / "toolkit", "launch", "distill", "--num-gpus", "1", "--no-bind-cores", *launch_args],
                work, env, check=False)
    assert (out / "student" / "config.json").is_file(), proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "toolkit.launchers.distill" in proc.stdout + proc.stderr
