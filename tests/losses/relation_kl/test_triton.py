"""Fused Triton relation KL vs the float64 reference and the chunked path.

CPU runs use Triton's interpreter. Triton decides interpreted-vs-compiled when its own
``tl.*`` helpers are decorated, i.e. at the first ``import triton``; so TRITON_INTERPRET is
set here before anything imports triton, and only on machines without CUDA (it switches the
whole process). With CUDA, run these with ``TRITON_INTERPRET=1 pytest tests/losses/relation_kl/...``;
the ``gpu`` test always runs the compiled Triton kernel in a child process without the variable.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_TRITON_FOUND = importlib.util.find_spec("triton") is not None
if _TRITON_FOUND and "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from toolkit.errors import ConfigError, ToolkitError  # noqa: E402
from toolkit.losses.relation_kl.chunked import relation_kl as chunked_relation_kl  # noqa: E402
from toolkit.losses.relation_kl.chunked import relation_kl_qk as chunked_relation_kl_qk  # noqa: E402
from toolkit.losses.reference import relation_kl_reference  # noqa: E402
from toolkit.losses.relation_kl import relation_kl_naive  # noqa: E402


def _interpreter_ready() -> str:
    """Empty string when the interpreter tests can run here, else the reason to skip."""
    if not _TRITON_FOUND:
        return "triton is not installed (pip install -c constraints.txt triton)"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("TRITON_INTERPRET is not 1 (CUDA present or set otherwise); run "
                "TRITON_INTERPRET=1 pytest tests/losses/relation_kl/test_triton.py")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.max, InterpretedFunction):
        return "triton was imported before TRITON_INTERPRET=1 was set in this process; run this file alone"
    return _interpreter_loop_probe()


def _interpreter_loop_probe() -> str:
    """Our kernels loop to a length passed as an argument. Triton 3.6's interpreter turns that
    argument into a loop bound with ``int()`` of a 1-element numpy array, which numpy 2.4
    refuses (Triton 3.9 squeezes it first): every interpreted test would fail inside Triton."""
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def _count(out, n):
        acc = 0
        for _ in range(0, n, 1):
            acc += 1
        tl.store(out, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count[(1,)](out, 3)
    except Exception as exc:  # noqa: BLE001 - any interpreter failure means these tests cannot run here
        return (f"Triton {triton.__version__}'s interpreter cannot execute a loop bounded by a kernel argument "
                f"with numpy {np.__version__} ({type(exc).__name__}); use a newer triton (3.9 works), or "
                f"run the compiled Triton kernel's tests on a GPU: pytest -m gpu tests/losses/relation_kl")
    return "" if int(out) == 3 else f"Triton's interpreter counted {int(out)} of 3 loop trips"


_SKIP_REASON = _interpreter_ready()
interpreted = pytest.mark.skipif(bool(_SKIP_REASON), reason=_SKIP_REASON or "n/a")

B16 = dict(block_m=16, block_n=16)


@pytest.fixture(scope="module")
def rk():
    """The kernel module, imported after TRITON_INTERPRET=1 so its kernels are interpreted."""
    import toolkit.losses.relation_kl.triton as mod

    return mod


def _ragged_mask(lengths, seq_len):
    return (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()


def _loss_and_grad(fn, t, s, mask, heads, **kw):
    """``fn(t, s', mask, heads)`` on a fresh leaf copy ``s'`` of ``s``: (loss, d loss / d s')."""
    leaf = s.clone().requires_grad_(True)
    loss = fn(t, leaf, mask, heads, **kw)
    loss.backward()
    return loss.detach(), leaf.grad


def _inputs(b=2, l=21, ht=48, hs=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, l, ht, generator=g).to(dtype), torch.randn(b, l, hs, generator=g).to(dtype))


@interpreted
@pytest.mark.parametrize("heads,l,lengths", [(1, 21, [21, 9]), (4, 37, [37, 20]), (8, 21, [13, 21])])
def test_value_and_grad_match_float64_reference(rk, heads, l, lengths):
    # L is never a multiple of the 16-row blocks, and Ht != Hs.
    t, s = _inputs(l=l)
    mask = _ragged_mask(lengths, l)
    got, got_grad = _loss_and_grad(rk.relation_kl, t, s, mask, heads, **B16)
    ref, ref_grad = _loss_and_grad(relation_kl_reference, t.double(), s.double(), mask, heads)
    assert got.dtype == torch.float32 and got.item() > 0
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


@interpreted
def test_float64_grads_match_reference_autograd_across_blocks(rk):
    t, s = _inputs(l=35, ht=24, hs=16, dtype=torch.float64, seed=1)
    mask = _ragged_mask([35, 18], 35)
    got, got_grad = _loss_and_grad(rk.relation_kl, t, s, mask, 4, **B16)
    ref, ref_grad = _loss_and_grad(relation_kl_reference, t, s, mask, 4)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-9, atol=1e-13)


@interpreted
def test_gradcheck_float64_small(rk):
    t, s = _inputs(b=2, l=3, ht=4, hs=2, dtype=torch.float64, seed=2)
    mask = _ragged_mask([3, 2], 3)
    s = s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: rk.relation_kl(t, x, mask, 2, **B16), (s,))


@interpreted
def test_gradcheck_qk_separate_sides(rk):
    g = torch.Generator().manual_seed(3)
    tq, tk = (torch.randn(2, 4, 6, generator=g, dtype=torch.float64) for _ in range(2))
    sq, sk = (torch.randn(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = _ragged_mask([4, 2], 4)
    # fast_mode: a few random directional derivatives instead of one per element (interpreter speed).
    assert torch.autograd.gradcheck(lambda a, b: rk.relation_kl_qk(tq, tk, a, b, mask, 2, **B16), (sq, sk),
                                    fast_mode=True)
    torch.testing.assert_close(rk.relation_kl_qk(tq, tk, sq, sk, mask, 2, **B16),
                               relation_kl_naive(tq, tk, sq, sk, mask, 2))


@interpreted
def test_qk_grads_match_chunked_path_fp32(rk):
    g = torch.Generator().manual_seed(4)
    tq, tk = (torch.randn(2, 19, 48, generator=g) for _ in range(2))
    sq, sk = (torch.randn(2, 19, 32, generator=g) for _ in range(2))
    mask = _ragged_mask([19, 7], 19)
    a1, b1 = sq.clone().requires_grad_(True), sk.clone().requires_grad_(True)
    got = rk.relation_kl_qk(tq, tk, a1, b1, mask, 4, **B16)
    got.backward()
    a2, b2 = sq.clone().requires_grad_(True), sk.clone().requires_grad_(True)
    want = chunked_relation_kl_qk(tq, tk, a2, b2, mask, 4, chunk_size=5)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-4, atol=1e-7)


@interpreted
@pytest.mark.parametrize("kw", [dict(block_m=32, block_n=16), dict(block_m=16, block_n=64), dict(chunk_size=3)])
def test_block_sizes_do_not_change_the_result(rk, kw):
    t, s = _inputs(l=21)
    mask = _ragged_mask([21, 6], 21)
    base = rk.relation_kl(t, s, mask, 4, **B16)
    kw = dict(kw, block_n=kw.get("block_n", 16))
    torch.testing.assert_close(rk.relation_kl(t, s, mask, 4, **kw), base, rtol=1e-6, atol=0)


@interpreted
def test_zero_when_student_equals_teacher_and_zero_grad(rk):
    t, _ = _inputs(l=18, ht=48)
    mask = _ragged_mask([18, 5], 18)
    s = t.clone().requires_grad_(True)
    loss = rk.relation_kl(t, s, mask, 4, **B16)
    assert abs(loss.item()) < 1e-7
    loss.backward()
    assert s.grad.abs().max().item() < 1e-7


@interpreted
def test_padded_positions_get_no_grad_and_do_not_change_loss(rk):
    t, s = _inputs(l=18)
    mask = _ragged_mask([18, 11], 18)
    s1 = s.clone().requires_grad_(True)
    loss = rk.relation_kl(t, s1, mask, 4, **B16)
    loss.backward()
    assert s1.grad[1, 11:].abs().max().item() == 0.0
    t2, s2 = t.clone(), s.clone()
    t2[1, 11:] = 100.0
    s2[1, 11:] = -7.0
    torch.testing.assert_close(rk.relation_kl(t2, s2, mask, 4, **B16), loss.detach(), rtol=1e-6, atol=0)


@interpreted
def test_fully_padded_sequence_stays_finite(rk):
    t, s = _inputs(l=17)
    mask = _ragged_mask([17, 0], 17)
    got, got_grad = _loss_and_grad(rk.relation_kl, t, s, mask, 4, **B16)
    want, want_grad = _loss_and_grad(chunked_relation_kl, t, s, mask, 4)
    assert torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)


@interpreted
def test_fp16_inputs_match_chunked_path(rk):
    # The interpreter multiplies bf16 as raw integers (a Triton interpreter limit), so bf16 is GPU-only.
    t, s = _inputs(l=21, dtype=torch.float16)
    mask = _ragged_mask([21, 12], 21)
    got, got_grad = _loss_and_grad(rk.relation_kl, t, s, mask, 4, **B16)
    want, want_grad = _loss_and_grad(chunked_relation_kl, t, s, mask, 4)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=2e-2, atol=1e-4)


@interpreted
def test_fp16_gradient_does_not_underflow_at_training_scale(rk):
    # dS = p_s - p_t is rounded to fp16 for the dot; the factor 1/(rows x heads x sqrt(d)) must be
    # applied after, on the fp32 accumulator, or most of dS falls below fp16's range. Without a
    # loss scale (grad_out = 1) the kernel lost 38% of the gradient here before the fix; the
    # chunked path, which only rounds the final gradient, loses 3%.
    g = torch.Generator().manual_seed(3)
    b, l, h, heads = 64, 64, 64, 8
    s16 = torch.randn(b, l, h, generator=g).half()
    t = (s16.float() + 0.05 * torch.randn(b, l, h, generator=g)).half()
    mask = torch.ones(b, l, dtype=torch.long)
    ref = s16.float().requires_grad_(True)
    chunked_relation_kl(t.float(), ref, mask, heads).backward()
    errs = {}
    for name, fn in (("triton", rk.relation_kl), ("chunked", chunked_relation_kl)):
        x = s16.clone().requires_grad_(True)
        fn(t, x, mask, heads).backward()
        errs[name] = ((x.grad.float() - ref.grad).norm() / ref.grad.norm()).item()
    assert errs["triton"] < 2 * errs["chunked"] + 1e-3, errs


@interpreted
def test_non_contiguous_inputs(rk):
    t, s = _inputs(l=18)
    mask = _ragged_mask([18, 9], 18)
    # Views with a transposed memory layout, as a hook might hand over.
    t_nc = t.transpose(0, 1).contiguous().transpose(0, 1)
    s_nc = s.transpose(0, 1).contiguous().transpose(0, 1)
    assert not s_nc.is_contiguous()
    torch.testing.assert_close(rk.relation_kl(t_nc, s_nc, mask.bool(), 4, **B16),
                               rk.relation_kl(t, s, mask, 4, **B16), rtol=1e-6, atol=0)


@interpreted
def test_bad_inputs_raise_toolkit_errors(rk):
    t, s = _inputs(l=8)
    mask = _ragged_mask([8, 3], 8)
    with pytest.raises(ConfigError, match="num_relation_heads"):
        rk.relation_kl(t, s, mask, 5)
    with pytest.raises(ToolkitError, match="share \\[batch, seq_len\\]"):
        rk.relation_kl(t, s[:, :7], mask, 4)
    with pytest.raises(ConfigError, match="block_m"):
        rk.relation_kl(t, s, mask, 4, block_m=0)
    with pytest.raises(ToolkitError, match="dtype"):
        rk.relation_kl(t, s.long(), mask, 4)
    with pytest.raises(ToolkitError, match="student's query side is torch.float32 but its key side"):
        rk.relation_kl_qk(t, t, s, s.double(), mask, 4)


def test_auto_falls_back_to_chunked_once_when_the_kernel_fails(monkeypatch):
    # A kernel that cannot compile or launch on some GPU/driver must not kill a long job on "auto".
    from toolkit.losses import relation_kl as registry

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("ptxas fatal: unsupported architecture")

    # CPU tensors stand in for a GPU's: a copy of the registry where "triton" takes them and breaks.
    monkeypatch.setattr(registry, "_IMPLS", dict(registry._IMPLS))
    monkeypatch.setattr(registry, "_FAILED", {})
    registry.register_relation_kl("triton", broken, priority=20)
    t, s = _inputs(l=9)
    mask = _ragged_mask([9, 4], 9)
    with pytest.warns(RuntimeWarning, match="triton failed on this machine.*ptxas fatal"):
        got = registry.compute_relation_kl("auto", t, t, s, s, mask, 4)
    torch.testing.assert_close(got, chunked_relation_kl(t, s, mask, 4))
    registry.compute_relation_kl("auto", t, t, s, s, mask, 4)
    assert calls == [1]   # not retried on every step
    assert "ptxas fatal" in registry.failed_implementations()["triton"]
    with pytest.raises(RuntimeError, match="ptxas"):   # named explicitly, the failure is an error
        registry.compute_relation_kl("triton", t, t, s, s, mask, 4)
    registry.register_relation_kl("triton", lambda *a, **k: chunked_relation_kl_qk(*a, **k), priority=20)
    with pytest.raises(ConfigError, match="num_relation_heads"):   # bad input is still an error
        registry.compute_relation_kl("auto", t, t, s, s, mask, 5)


@interpreted
def test_cpu_tensors_without_interpreter_fall_back_to_chunked(rk, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    t, s = _inputs(l=9)
    mask = _ragged_mask([9, 4], 9)
    with pytest.warns(RuntimeWarning, match="chunked torch path"):
        got = rk.relation_kl(t, s, mask, 4)
    torch.testing.assert_close(got, chunked_relation_kl(t, s, mask, 4))


_GPU_SCRIPT = textwrap.dedent("""
    import torch
    from toolkit.losses.relation_kl import triton as rk
    from toolkit.losses.relation_kl.chunked import relation_kl as chunked
    from toolkit.losses.reference import relation_kl_reference
    from toolkit.losses.relations import MiniLMv2RelationLoss
    from triton.runtime.jit import JITFunction
    assert isinstance(rk._relation_kl_fwd, JITFunction), "kernel is not compiled"
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    b, l, ht, hs = 3, 200, 96, 64
    mask = (torch.arange(l)[None] < torch.tensor([200, 131, 1])[:, None]).long().to(dev)
    t = torch.randn(b, l, ht, generator=g).to(dev)
    s = torch.randn(b, l, hs, generator=g).to(dev)
    for heads in (1, 8, 32):  # d_t 96 loops over head slices; d_s 2 is padded to 16
        s1 = s.clone().requires_grad_(True)
        got = rk.relation_kl(t, s1, mask, heads)
        got.backward()
        s2 = s.double().requires_grad_(True)
        ref = relation_kl_reference(t.double(), s2, mask, heads)
        ref.backward()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-7)
    for dtype in (torch.bfloat16, torch.float16):
        th, sh = t.to(dtype), s.to(dtype)
        s1, s2 = sh.clone().requires_grad_(True), sh.clone().requires_grad_(True)
        got, want = rk.relation_kl(th, s1, mask, 8), chunked(th, s2, mask, 8)
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, rtol=2e-3, atol=0)
        err = (s1.grad.float() - s2.grad.float()).abs().max() / s2.grad.float().abs().max()
        assert err < 2e-2, (dtype, err.item())
    # fp16 at training scale: the gradient must not underflow (dS scaled after the dot).
    s32 = torch.randn(32, 512, 384, generator=g).to(dev)
    t16 = (s32 + 0.05 * torch.randn(32, 512, 384, generator=g).to(dev)).half()
    full = torch.ones(32, 512, dtype=torch.long, device=dev)
    ref = s32.clone().requires_grad_(True)
    chunked(t16.float(), ref, full, 12).backward()
    x16 = s32.half().requires_grad_(True)
    rk.relation_kl(t16, x16, full, 12).backward()
    err = ((x16.grad.float() - ref.grad).norm() / ref.grad.norm()).item()
    assert err < 5e-3, err
    # More than 65535 (batch x head) programs: B*R sits on grid axis 0.
    tb, sb = torch.randn(1100, 16, 64, device=dev), torch.randn(1100, 16, 64, device=dev)
    mb = torch.ones(1100, 16, dtype=torch.long, device=dev)
    torch.testing.assert_close(rk.relation_kl(tb, sb, mb, 64), chunked(tb, sb, mb, 64), rtol=1e-5, atol=0)
    qkv_s = {k: torch.randn(b, l, hs, generator=g).to(dev).requires_grad_(True) for k in "qkv"}
    qkv_t = {k: torch.randn(b, l, ht, generator=g).to(dev) for k in "qkv"}
    fused = MiniLMv2RelationLoss(8, impl="triton")(qkv_s, qkv_t, mask)["loss"]
    plain = MiniLMv2RelationLoss(8, impl="chunked")(qkv_s, qkv_t, mask)["loss"]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=0)
    print("GPU-OK")
""")


@pytest.mark.gpu
def test_compiled_kernel_on_cuda_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not _TRITON_FOUND:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A child process: this one may already have triton in interpreter mode.
    proc = subprocess.run([sys.executable, "-c", _GPU_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900, cwd=Path(__file__).resolve().parents[3])
    assert proc.returncode == 0 and "GPU-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
