"""The compiled CPU row kernel of the chunked relation KL (toolkit/kernels/cpu_rows.py): it
builds here, its exp, its values and gradients against the float64 reference and against the
torch block math, the merged self-relation gradient, and every way of falling back."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from toolkit.kernels import cpu_rows
from toolkit.kernels.relation_kl_chunked import relation_kl, relation_kl_qk
from toolkit.losses.reference import relation_kl_reference
from toolkit.losses.relations import describe_relation_kl, relation_kl_naive

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _blocks_not_the_fused_kernel():
    """These tests are about the row kernel inside the chunked blocks: the fused relation KL
    (its own tests: test_cpu_relation.py) stays off."""
    from toolkit.kernels import cpu_relation

    with cpu_relation.disabled():
        yield


def _ragged_mask(lengths, seq_len):
    return (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.fixture
def kernel():
    k = cpu_rows.load()
    if k is None:
        pytest.skip(f"the compiled CPU row kernel does not run here: {cpu_rows.unavailable_reason()}")
    return k


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty kernel cache and no loaded kernel; the real state comes back afterwards."""
    monkeypatch.setenv("TOOLKIT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TOOLKIT_CPU_KERNEL", raising=False)
    cpu_rows.reset()
    yield tmp_path / "cache"
    cpu_rows.reset()


def test_kernel_builds_on_a_linux_host_with_a_c_compiler(fresh):
    """CI has gcc: the kernel must build and pass its self-check there, not quietly fall back."""
    if not sys.platform.startswith("linux") or cpu_rows.find_compiler() is None:
        pytest.skip("needs Linux and a C compiler (the fallback is tested below)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = cpu_rows.load()
    assert k is not None, cpu_rows.unavailable_reason()
    assert k.path.parent == fresh and k.path.suffix == ".so"
    assert cpu_rows.unavailable_reason() is None
    assert "compiled CPU row kernel" in cpu_rows.describe()
    assert "compiled CPU row kernel" in describe_relation_kl("chunked", torch.device("cpu"), 32, 12, 128)


def test_cache_is_reused_and_keyed_by_cpu(fresh, monkeypatch):
    if cpu_rows.load() is None:
        pytest.skip(f"no kernel here: {cpu_rows.unavailable_reason()}")
    first = cpu_rows.load().path
    mtime = first.stat().st_mtime_ns
    cpu_rows.reset()
    again = cpu_rows.load()
    assert again.path == first and first.stat().st_mtime_ns == mtime and again.built_s < 5
    # Another CPU (a cluster node sharing the home directory) gets its own -march=native build.
    cpu_rows.reset()
    monkeypatch.setattr(cpu_rows, "_cpu_id", lambda: "model name: another CPU\nflags: sse2")
    other = cpu_rows.load()
    assert other is not None and other.path != first
    assert sorted(p.name for p in fresh.glob("*.so")) == sorted([first.name, other.path.name])
    assert not list(fresh.glob("*.tmp"))


def test_exp_matches_float64_and_flushes_below_minus_87(kernel):
    x = torch.linspace(-87.0, 0.0, 200_001)
    got = kernel.exp_nonpos(x).double()
    want = torch.exp(x.double())
    rel = ((got - want).abs() / want).max().item()
    assert rel < 3e-7, rel
    tail = torch.tensor([-87.0001, -88.0, -1e4, -3.4e38, float(torch.finfo(torch.float32).min)])
    assert torch.equal(kernel.exp_nonpos(tail), torch.zeros(5))
    assert kernel.exp_nonpos(torch.zeros(1)).item() == 1.0


@pytest.mark.parametrize("chunk", [None, 3, 11])
def test_values_and_gradients_match_float64_reference(kernel, chunk):
    """Self relation, ragged padding, teacher and student head sizes differ (48/4 vs 32/4);
    chunk None and 11 take whole-row blocks (the merged g + g^T gradient), 3 does not."""
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 11, 48, generator=g), torch.randn(3, 11, 32, generator=g)
    mask = _ragged_mask([11, 7, 2], 11)
    x = s.clone().requires_grad_(True)
    loss = relation_kl(t, x, mask, 4, chunk_size=chunk)
    loss.backward()
    ref_x = s.double().requires_grad_(True)
    ref = relation_kl_reference(t.double(), ref_x, mask, 4)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), ref_x.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(x.grad[1, 7:] == 0) and torch.all(x.grad[2, 2:] == 0)


def test_student_near_its_teacher_keeps_the_small_kl_accurate(kernel):
    """KL ~1e-4 is a difference of O(1e-2) terms: the compiled rows sum e_s - e_t term by term
    and take a - s before the maxima, and stay within 1e-5 of float64 (the torch block math is
    at ~4e-5 on this input; a first version with plain fp32 sums was at 5e-5)."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 64, 32, generator=g)
    s = t + 0.01 * torch.randn(4, 64, 32, generator=g)
    mask = torch.ones(4, 64)
    mask[1, 40:] = 0
    ref = relation_kl_reference(t.double(), s.double(), mask, 4)
    assert 1e-5 < ref.item() < 1e-3
    torch.testing.assert_close(relation_kl(t, s, mask, 4).double(), ref, rtol=1e-5, atol=0)


def test_cross_relation_both_gradients_match_reference(kernel):
    """Query side and key side different tensors (MiniLM v1's Q-K): no merging, two gradients."""
    g = torch.Generator().manual_seed(5)
    tq, tk = torch.randn(4, 13, 24, generator=g), torch.randn(4, 13, 24, generator=g)
    sq0, sk0 = torch.randn(4, 13, 12, generator=g), torch.randn(4, 13, 12, generator=g)
    mask = _ragged_mask([13, 1, 9, 4], 13)
    sq, sk = sq0.clone().requires_grad_(True), sk0.clone().requires_grad_(True)
    got = relation_kl_qk(tq, tk, sq, sk, mask, 3, chunk_size=5)
    got.backward()
    rq, rk = sq0.double().requires_grad_(True), sk0.double().requires_grad_(True)
    ref = relation_kl_naive(tq.double(), tk.double(), rq, rk, mask, 3)
    ref.backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(sq.grad.double(), rq.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(sk.grad.double(), rk.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(4, 64, 384, 12), (2, 100, 96, 8)])
def test_same_numbers_as_torch_block_math(kernel, shape):
    """The compiled rows and the torch passes agree to fp32 rounding on realistic sizes, with
    padding, and with and without the merged gradient (whole rows vs 24-row blocks)."""
    b, l, h, r = shape
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(b, l, h, generator=g) * 2, torch.randn(b, l, h, generator=g) * 2
    mask = _ragged_mask([l, l // 2] + [l] * (b - 2), l)
    results = {}
    for name in ("compiled", "torch"):
        for chunk in (None, 24):
            x = s.clone().requires_grad_(True)
            if name == "torch":
                with cpu_rows.disabled():
                    loss = relation_kl(t, x, mask, r, chunk_size=chunk)
            else:
                loss = relation_kl(t, x, mask, r, chunk_size=chunk)
            loss.backward()
            results[name, chunk] = (loss.detach(), x.grad)
    ref_loss, ref_grad = results["torch", None]
    for key, (loss, grad) in results.items():
        torch.testing.assert_close(loss, ref_loss, rtol=2e-6, atol=0, msg=f"{key}")
        # Elementwise relative error means little where a gradient entry cancels to ~0: the
        # tolerance is 3e-6 of the largest entry. Against float64 both are at ~0.5-1.5e-6 of it
        # (p_s - p_t of a student near its teacher cancels; the exps round differently).
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=3e-6 * float(ref_grad.abs().max()),
                                   msg=f"{key}")


def test_results_do_not_depend_on_the_thread_count(kernel):
    """Rows are independent and reduced inside one thread: bit-identical across thread counts."""
    g = torch.Generator().manual_seed(2)
    t, s = torch.randn(3, 40, 64, generator=g), torch.randn(3, 40, 64, generator=g)
    mask = _ragged_mask([40, 33, 17], 40)
    out = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = s.clone().requires_grad_(True)
            loss = relation_kl(t, x, mask, 4)
            loss.backward()
            out.append((loss.detach(), x.grad))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_block_refuses_what_its_pointers_cannot_walk(kernel):
    a, s = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernel.block(a, s.transpose(-1, -2).contiguous().transpose(-1, -2), 3, 0, None, True, False)
    with pytest.raises(ValueError, match="contiguous fp32"):
        kernel.block(a.double(), s.double(), 3, 0, None, True, False)
    with pytest.raises(ValueError, match="uint8"):
        kernel.block(a, s, 3, 0, torch.ones(2, 4, dtype=torch.uint8), True, False)   # mask [n, rows], not [n, L]
    assert kernel.block(a, s, 3, 0, torch.ones(2, 5, dtype=torch.uint8), True, False).shape == (2, 3, 4)


def test_no_grad_forward_uses_the_kernel_and_matches(kernel):
    g = torch.Generator().manual_seed(4)
    t, s = torch.randn(2, 30, 32, generator=g), torch.randn(2, 30, 32, generator=g)
    mask = _ragged_mask([30, 12], 30)
    with torch.no_grad():
        got = relation_kl(t, s, mask, 4)
    torch.testing.assert_close(got.double(), relation_kl_reference(t.double(), s.double(), mask, 4),
                               rtol=1e-5, atol=0)


def test_env_switch_turns_it_off(fresh, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CPU_KERNEL", "0")
    assert cpu_rows.load() is None
    assert cpu_rows.unavailable_reason() == "turned off by TOOLKIT_CPU_KERNEL=0"
    assert cpu_rows.describe().startswith("torch block math (turned off by TOOLKIT_CPU_KERNEL=0")
    assert not fresh.exists()   # nothing was built
    t, s = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.ones(2, 6)
    torch.testing.assert_close(relation_kl(t, s, mask, 2).double(), relation_kl_reference(t, s, mask, 2),
                               rtol=1e-5, atol=0)


def test_a_compiler_that_fails_falls_back_with_the_reason(fresh, monkeypatch):
    false = shutil.which("false") or "/bin/false"
    monkeypatch.setenv("CC", false)
    with pytest.warns(RuntimeWarning, match=r"compiled CPU row kernel is not used \(RuntimeError: could not compile"):
        assert cpu_rows.load() is None
    assert "could not compile" in cpu_rows.unavailable_reason()
    assert "torch block math (RuntimeError: could not compile" in cpu_rows.describe()
    # The loss still runs, with the torch block math, and warns only once.
    t, s = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = _ragged_mask([6, 3], 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = relation_kl(t, s, mask, 2)
    torch.testing.assert_close(got.double(), relation_kl_reference(t, s, mask, 2), rtol=1e-5, atol=0)


def test_a_wrong_build_is_caught_by_the_self_check(fresh, monkeypatch, tmp_path):
    """A build whose numbers are off (here: every row's KL doubled) never runs."""
    if cpu_rows.find_compiler() is None or not sys.platform.startswith("linux"):
        pytest.skip("needs Linux and a C compiler")
    bad = tmp_path / "relation_kl_rows.c"
    text = cpu_rows.SOURCE.read_text()
    good = "row_kl[i] = relkl_row(ar, sr, L, kv, &st, &ss);"
    assert good in text
    bad.write_text(text.replace(good, "row_kl[i] = 2.0f * relkl_row(ar, sr, L, kv, &st, &ss);"))
    monkeypatch.setattr(cpu_rows, "SOURCE", bad)
    with pytest.warns(RuntimeWarning, match="row KL differs from the torch block math"):
        assert cpu_rows.load() is None


def test_a_fresh_process_builds_and_runs_it(tmp_path):
    """What a job does: import, first loss call builds into the cache, the log line names it."""
    code = ("import torch; from toolkit.kernels import cpu_rows; from toolkit.kernels.relation_kl_chunked "
            "import relation_kl; t=torch.randn(2,8,16); s=torch.randn(2,8,16,requires_grad=True); "
            "relation_kl(t,s,torch.ones(2,8),4).backward(); print(cpu_rows.describe())")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TOOLKIT_KERNEL_CACHE": str(tmp_path),
           "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    if os.environ.get("CC"):
        env["CC"] = os.environ["CC"]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if cpu_rows.find_compiler() is None:
        assert "torch block math" in proc.stdout
    else:
        assert "compiled CPU row kernel (relation_kl_rows-" in proc.stdout, proc.stdout + proc.stderr
        assert len(list(tmp_path.glob("relation_kl_rows-*.so"))) == 1
