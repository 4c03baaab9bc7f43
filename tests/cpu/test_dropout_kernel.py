"""The compiled CPU dropout-mask generator (toolkit/kernels/cpu_dropout.py): it builds here, its
words are splitmix64's, its masks follow the keep rule at the right rate, are reproducible from
torch's generator (seeds, saved RNG states, activation checkpointing), its masked scale is
torch's ``x * keep * scale`` to the bit, and every fallback."""
from __future__ import annotations


import pytest
import torch

from toolkit.kernels import cpu_dropout
from toolkit.models.dropout import fast_dropout, keep_mask, keep_threshold


@pytest.fixture
def kernel(compiled_checks):
    return compiled_checks.loaded(cpu_dropout)


def test_builds_on_a_linux_host_with_a_c_compiler(compiled_checks):
    compiled_checks.builds(cpu_dropout, "dropout-")


def test_words_are_splitmix64_and_masks_follow_the_keep_rule(kernel):
    # splitmix64's published first output for seed 0.
    assert cpu_dropout.splitmix64(0, 1) == [0xE220A8397B1DCDAF]
    assert kernel.words(5, 12345) == cpu_dropout.splitmix64(12345, 5)
    for n in (0, 1, 3, 4, 5, 4097):
        for k in (0, 1, 3277, 1 << 14, (1 << 15) - 1, 1 << 15):
            assert torch.equal(kernel.keep_mask(n, k, 99 + n), cpu_dropout.reference_mask(n, k, 99 + n))
    with pytest.raises(ValueError, match="threshold"):
        kernel.keep_mask(4, (1 << 15) + 1, 0)


def test_rate_and_independence(kernel):
    """The keep rate within 5 standard errors of 1 - k / 2^15, for several rates, and neighbouring
    elements (fields of one word, adjacent words) uncorrelated."""
    n = 1 << 20
    for p in (0.1, 0.5, 0.9):
        k = keep_threshold(p)
        m = kernel.keep_mask(n, k, 7).float()
        rate = 1 - k / 32768
        se = (rate * (1 - rate) / n) ** 0.5
        assert abs(float(m.mean()) - rate) < 5 * se
        for lag in (1, 2, 4, 5):
            c = torch.corrcoef(torch.stack([m[:-lag], m[lag:]]))[0, 1]
            assert abs(float(c)) < 5 / n ** 0.5


def test_masks_are_reproducible_from_torchs_generator(kernel):
    torch.manual_seed(3)
    a = keep_mask(torch.Size([4, 100]), 0.1)
    b = keep_mask(torch.Size([4, 100]), 0.1)
    assert not torch.equal(a, b)                       # a fresh seed each call
    torch.manual_seed(3)
    assert torch.equal(keep_mask(torch.Size([4, 100]), 0.1), a)
    state = torch.get_rng_state()
    c = keep_mask(torch.Size([4, 100]), 0.1)
    torch.set_rng_state(state)
    assert torch.equal(keep_mask(torch.Size([4, 100]), 0.1), c)


def test_dropout_under_activation_checkpointing_matches(kernel):
    """Checkpointing replays torch's RNG state, so the recomputed mask is the forward's."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(8, 64, requires_grad=True)
    torch.manual_seed(0)
    plain = fast_dropout(x * 2.0, 0.3)
    plain.sum().backward()
    g_plain = x.grad.clone()
    x.grad = None
    torch.manual_seed(0)
    ck = checkpoint(lambda t: fast_dropout(t * 2.0, 0.3), x, use_reentrant=False)
    ck.sum().backward()
    assert torch.equal(ck, plain) and torch.equal(x.grad, g_plain)


def test_env_switch_and_no_compiler_fall_back_to_torchs_generator(compiled_checks):
    compiled_checks.switched_off(cpu_dropout)
    torch.manual_seed(1)
    m = keep_mask(torch.Size([1000]), 0.25)                 # the fallback: torch's generator
    assert 0.65 < float(m.float().mean()) < 0.85
    compiled_checks.no_compiler_and_disabled(cpu_dropout)


def test_a_wrong_build_is_caught_by_the_self_check(compiled_checks):
    compiled_checks.wrong_build_is_caught(cpu_dropout, 'dst[3] = (uint32_t)((z >> 48) & 0x7fff) >= k;',
                                          'dst[3] = (uint32_t)((z >> 47) & 0x7fff) >= k;', match="keep mask")


def test_masked_scale_is_torchs_to_the_bit_nan_included(kernel):
    gen = torch.Generator().manual_seed(0)
    for n in (1, 15, 16, 17, 4099):
        x = torch.randn(n, generator=gen) * 3.0
        keep = torch.rand(n, generator=gen) > 0.3
        if n > 2:
            x[1], x[2] = float("nan"), float("inf")     # a dropped NaN stays NaN, as in torch
            keep[1], keep[2] = False, False
        got = kernel.masked_scale(x, keep, 1.1112)
        want = torch.ops.aten.native_dropout_backward(x, keep, 1.1112)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    y = torch.randn(2, 3, 5)
    for bad_x, bad_keep in ((y.double(), y > 0), (y.transpose(0, 1), y.transpose(0, 1) > 0), (y, (y > 0).short()),
                            (y, (y > 0)[:1])):
        with pytest.raises(ValueError, match="masked_scale"):
            kernel.masked_scale(bad_x, bad_keep, 2.0)


def test_dropout_forward_and_backward_on_the_masked_scale_kernel(kernel):
    """fast_dropout's output and gradient are x * keep * scale and g * keep * scale, through the
    kernel for contiguous fp32 and through ATen for the rest (a strided gradient, float64)."""
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(4, 33, 24, dtype=dtype, requires_grad=True)
        torch.manual_seed(5)
        y = fast_dropout(x, 0.2)
        keep = y != 0
        scale = 32768 / (32768 - keep_threshold(0.2))
        assert torch.allclose(y, x.detach() * keep * scale, rtol=0, atol=0)
        g = torch.randn(24, 33, 4, dtype=dtype).permute(2, 1, 0)      # non-contiguous: the ATen path
        y.backward(g)
        assert torch.allclose(x.grad, g * keep * scale, rtol=0, atol=0)
        x.grad = None
        y = fast_dropout(x, 0.2)
        keep = y != 0
        y.backward(torch.ones_like(y))
        assert torch.equal(x.grad, keep.to(dtype) * scale)
