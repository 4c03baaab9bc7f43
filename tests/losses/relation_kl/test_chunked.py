"""The chunked relation KL (plain PyTorch) vs the float64 reference: values, gradients, masking, memory growth."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from toolkit.errors import ConfigError, ToolkitError
from toolkit.losses.reference import relation_kl_reference
from toolkit.losses.relation_kl import relation_kl_naive
from toolkit.losses.relation_kl.chunked import auto_chunk_size, relation_kl, relation_kl_qk


def _ragged_mask(lengths, seq_len):
    return (torch.arange(seq_len)[None, :] < torch.tensor(lengths)[:, None]).long()


def _inputs(b=3, l=11, ht=48, hs=32, dtype=torch.float32, seed=0, scale=1.0):
    # scale 1: a single 48-wide head at scale 1.5 is near one-hot (KL ~1e-3), where fp32 logit
    # rounding alone is ~1e-4 relative; that regime is covered by the float64 gradcheck instead.
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(b, l, ht, generator=g) * scale).to(dtype)
    s = (torch.randn(b, l, hs, generator=g) * scale).to(dtype)
    return t, s


@pytest.mark.parametrize("chunk", [None, 1, 3, 4, 11, 64])
@pytest.mark.parametrize("heads", [1, 4, 8])
def test_value_matches_float64_reference_ragged(chunk, heads):
    t, s = _inputs()
    mask = _ragged_mask([11, 7, 2], 11)
    got = relation_kl(t, s, mask, heads, chunk_size=chunk)
    ref = relation_kl_reference(t, s, mask, heads)
    assert got.dtype == torch.float32
    assert got.item() > 0
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("chunk", [2, 5, None])
def test_grad_matches_reference_autograd(chunk):
    t, s = _inputs(l=9)
    mask = _ragged_mask([9, 4, 6], 9)
    s1 = s.clone().requires_grad_(True)
    relation_kl(t, s1, mask, 4, chunk_size=chunk).backward()
    s2 = s.double().requires_grad_(True)
    relation_kl_reference(t.double(), s2, mask, 4).backward()
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-7)


def test_gradcheck_float64_small():
    t, s = _inputs(b=2, l=5, ht=6, hs=4, dtype=torch.float64)
    mask = _ragged_mask([5, 3], 5)
    s = s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: relation_kl(t, x, mask, 2, chunk_size=2), (s,))


def test_gradcheck_qk_separate_sides():
    g = torch.Generator().manual_seed(3)
    tq, tk = torch.randn(2, 4, 6, generator=g, dtype=torch.float64), torch.randn(2, 4, 6, generator=g,
                                                                              dtype=torch.float64)
    sq = torch.randn(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    sk = torch.randn(2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    mask = _ragged_mask([4, 2], 4)
    assert torch.autograd.gradcheck(lambda a, b: relation_kl_qk(tq, tk, a, b, mask, 2, chunk_size=3), (sq, sk))
    naive = relation_kl_naive(tq, tk, sq, sk, mask, 2)
    torch.testing.assert_close(relation_kl_qk(tq, tk, sq, sk, mask, 2, chunk_size=3), naive)


def test_gradient_made_in_the_forward_follows_grad_mode_and_upstream():
    """The forward computes the student gradient (the loss is a terminal scalar); the backward
    scales it by the upstream value. One side without requires_grad, no_grad, and a weighted
    loss used with retain_graph all give the reference gradients."""
    g = torch.Generator().manual_seed(7)
    tq, tk = torch.randn(2, 6, 8, generator=g, dtype=torch.float64), torch.randn(2, 6, 8, generator=g,
                                                                              dtype=torch.float64)
    sq0, sk0 = torch.randn(2, 6, 8, generator=g, dtype=torch.float64), torch.randn(2, 6, 8, generator=g,
                                                                                dtype=torch.float64)
    mask = _ragged_mask([6, 4], 6)
    # Only the query side requires a gradient.
    a = sq0.clone().requires_grad_(True)
    relation_kl_qk(tq, tk, a, sk0, mask, 2, chunk_size=4).backward()
    b = sq0.clone().requires_grad_(True)
    relation_kl_naive(tq, tk, b, sk0, mask, 2).backward()
    torch.testing.assert_close(a.grad, b.grad)
    # Under no_grad: the same value, nothing to differentiate.
    with torch.no_grad():
        val = relation_kl_qk(tq, tk, sq0.requires_grad_(True), sk0, mask, 2)
    assert not val.requires_grad
    torch.testing.assert_close(val, relation_kl_naive(tq, tk, sq0.detach(), sk0, mask, 2))
    # A weighted loss, backpropagated twice: the upstream factor is applied each time.
    s = sq0.detach().clone().requires_grad_(True)
    loss = relation_kl(tq, s, mask, 2, chunk_size=5)
    (3.0 * loss).backward(retain_graph=True)
    first = s.grad.clone()
    (0.5 * loss).backward()
    ref = sq0.detach().clone().requires_grad_(True)
    relation_kl_reference(tq, ref, mask, 2).backward()
    torch.testing.assert_close(first, 3.0 * ref.grad)
    torch.testing.assert_close(s.grad, 3.5 * ref.grad)


def test_zero_when_student_equals_teacher_and_zero_grad():
    t, _ = _inputs(hs=48)
    mask = _ragged_mask([11, 5, 8], 11)
    s = t.clone().requires_grad_(True)
    loss = relation_kl(t, s, mask, 6, chunk_size=4)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.abs().max().item() < 1e-7


def test_padded_positions_get_no_grad_and_do_not_change_loss():
    t, s = _inputs(l=8)
    mask = _ragged_mask([8, 5, 3], 8)
    s = s.requires_grad_(True)
    loss = relation_kl(t, s, mask, 4, chunk_size=3)
    loss.backward()
    pad = mask == 0
    assert s.grad[pad].abs().max().item() == 0.0
    assert s.grad[~pad].abs().max().item() > 0
    # Garbage in padded positions (either side) must not change the value.
    t2, s2 = t.clone(), s.detach().clone()
    t2[pad] = 1e3
    s2[pad] = -7.0
    torch.testing.assert_close(relation_kl(t2, s2, mask, 4, chunk_size=3), loss.detach())


def test_teacher_gets_no_grad():
    t, s = _inputs()
    t = t.requires_grad_(True)
    s = s.requires_grad_(True)
    relation_kl(t, s, torch.ones(3, 11), 4).backward()
    assert t.grad is None and s.grad is not None


def test_fully_padded_sequence_is_finite():
    t, s = _inputs(b=2, l=4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    s = s.requires_grad_(True)
    loss = relation_kl(t, s, mask, 4, chunk_size=2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss.double(), relation_kl_reference(t, s, mask, 4), rtol=1e-5, atol=0)


def test_bf16_inputs_use_fp32_statistics():
    t, s = _inputs(dtype=torch.bfloat16, b=1, l=6)
    mask = torch.ones(1, 6)
    s = s.requires_grad_(True)
    loss = relation_kl(t, s, mask, 4, chunk_size=4)
    assert loss.dtype == torch.float32
    ref = relation_kl_reference(t.double(), s.double(), mask, 4)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16


def test_indivisible_heads_raise_config_error():
    t, s = _inputs(ht=48, hs=30)
    with pytest.raises(ConfigError) as e:
        relation_kl(t, s, torch.ones(3, 11), 4)
    msg = str(e.value)
    assert "num_relation_heads" in msg and "30" in msg and "48" in msg


def test_bad_chunk_and_shape_mismatch():
    t, s = _inputs()
    with pytest.raises(ConfigError, match="chunk_size"):
        relation_kl(t, s, torch.ones(3, 11), 4, chunk_size=0)
    with pytest.raises(ToolkitError, match="batch, seq_len"):
        relation_kl(t[:, :5], s, torch.ones(3, 11), 4)


def test_auto_chunk_size_respects_budget():
    assert auto_chunk_size(2, 4, 16, budget_bytes=10**12) == 16
    block = auto_chunk_size(8, 16, 4096, budget_bytes=64 * 1024 * 1024)
    assert 1 <= block < 4096
    assert block * 8 * 16 * 4096 * 4 * 6 <= 64 * 1024 * 1024


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def _largest_alloc(fn, b, l, h, heads, chunk):
    t, s = _inputs(b=b, l=l, ht=h, hs=h)
    s = s.requires_grad_(True)
    mask = torch.ones(b, l)
    with _LargestTensor() as probe:
        fn(t, s, mask, heads, chunk).backward()
    return probe.largest


def test_peak_tensor_grows_linearly_in_seq_len():
    b, h, heads, chunk = 2, 16, 4, 8
    chunked = lambda t, s, m, r, c: relation_kl(t, s, m, r, chunk_size=c)  # noqa: E731
    naive = lambda t, s, m, r, c: relation_kl_naive(t, s, t, s, m, r)  # noqa: E731
    small, big = _largest_alloc(chunked, b, 64, h, heads, chunk), _largest_alloc(chunked, b, 256, h, heads, chunk)
    # No tensor beyond one block [B, R, block, L] or the inputs [B, L, H].
    assert big <= max(b * heads * chunk * 256, b * 256 * h)
    assert big <= 4 * small * 1.01            # 4x length -> at most 4x, not 16x
    # The probe does see quadratic growth where it exists.
    n_small, n_big = _largest_alloc(naive, b, 64, h, heads, None), _largest_alloc(naive, b, 256, h, heads, None)
    assert n_big >= 16 * n_small * 0.99


def test_float64_inputs_near_one_hot_match_reference_tightly():
    t, s = _inputs(dtype=torch.float64, scale=1.5)
    mask = _ragged_mask([11, 7, 2], 11)
    got = relation_kl(t, s, mask, 1, chunk_size=4)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, relation_kl_reference(t, s, mask, 1), rtol=1e-10, atol=0)


def test_fp16_student_gradient_survives_loss_scaling():
    # DeepSpeed fp16 multiplies the loss by its scale (2^16 at the start) and the gradient comes
    # back through grad_out. The gradient computed in the forward must meet that factor before it
    # is rounded to fp16: it is ~1/(tokens x heads) small, and rounded first most of it was 0
    # once the student was close to its teacher (8.5% zeros here, 91% at batch 32 x 512).
    torch.manual_seed(0)
    b, l, h, r = 8, 128, 384, 12
    s32 = torch.randn(b, l, h)
    t = (s32 + 0.05 * torch.randn(b, l, h)).to(torch.bfloat16)
    mask = torch.ones(b, l, dtype=torch.long)
    x = s32.clone().requires_grad_(True)
    relation_kl(t, x, mask, r).backward()
    scale = 2.0 ** 16
    y = s32.to(torch.float16).requires_grad_(True)
    (relation_kl(t, y, mask, r) * scale).backward()
    assert y.grad.dtype == torch.float16
    g = y.grad.float() / scale
    assert (g == 0).float().mean().item() < 1e-3
    assert ((g - x.grad).norm() / x.grad.norm()).item() < 1e-2


@pytest.mark.parametrize("budget, want_batch_block", [(1, 1), (None, 5)])
def test_batch_sliced_blocks_match_reference_with_padding(budget, want_batch_block):
    """CPU blocks slice the batch (plan_blocks): with a tiny budget every sample is its own
    block (5 slices, padded rows in some); values and both gradients of a cross relation must
    not change, the mean still over the real rows of the whole batch."""
    from toolkit.losses.relation_kl.chunked import plan_blocks

    assert plan_blocks(5, 2, 7, on_cpu=True, chunk_size=3, budget_bytes=budget)[0] == want_batch_block
    g = torch.Generator().manual_seed(11)
    tq, tk = (torch.randn(5, 7, 6, generator=g, dtype=torch.float64) for _ in range(2))
    sq0, sk0 = (torch.randn(5, 7, 4, generator=g, dtype=torch.float64) for _ in range(2))
    mask = _ragged_mask([7, 3, 7, 1, 5], 7)
    sq, sk = sq0.clone().requires_grad_(True), sk0.clone().requires_grad_(True)
    relation_kl_qk(tq, tk, sq, sk, mask, 2, chunk_size=3, budget_bytes=budget).backward()
    rq, rk = sq0.clone().requires_grad_(True), sk0.clone().requires_grad_(True)
    ref = relation_kl_naive(tq, tk, rq, rk, mask, 2)
    ref.backward()
    got = relation_kl_qk(tq, tk, sq0, sk0, mask, 2, chunk_size=3, budget_bytes=budget)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sq.grad, rq.grad, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(sk.grad, rk.grad, rtol=1e-10, atol=1e-14)
    # A self relation through the public entry point, auto rows, one sample per block.
    t, s = _inputs(b=5, l=9)
    m = _ragged_mask([9, 2, 9, 6, 4], 9)
    torch.testing.assert_close(relation_kl(t, s, m, 4, budget_bytes=1).double(),
                               relation_kl_reference(t, s, m, 4), rtol=1e-5, atol=0)


def test_plan_blocks_cpu_and_accelerator():
    from toolkit.losses.relation_kl.chunked import plan_blocks

    # CPU: 32-256 rows, the batch sliced to fit the 24 MiB budget (the benchmark's shapes).
    assert plan_blocks(16, 12, 512, on_cpu=True) == (1, 170)
    assert plan_blocks(32, 12, 128, on_cpu=True) == (5, 128)
    assert plan_blocks(2, 4, 16, on_cpu=True) == (2, 16)
    # Accelerators: the whole batch, rows from the 256 MiB budget.
    assert plan_blocks(16, 12, 512, on_cpu=False) == (16, auto_chunk_size(16, 12, 512))
    with pytest.raises(ConfigError, match="chunk_size"):
        plan_blocks(2, 4, 16, on_cpu=True, chunk_size=0)
