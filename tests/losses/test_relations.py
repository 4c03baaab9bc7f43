"""MiniLMv2RelationLoss: implementations agree with the float64 reference; config errors."""
from __future__ import annotations

import pytest
import torch

from toolkit.errors import ConfigError, ToolkitError
from toolkit.losses import LOSSES, MiniLMv2RelationLoss, minilm_v2_reference


def _qkv(b, l, h, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, l, h, generator=g) for k in "qkv"}


def _mask():
    return torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]])


@pytest.mark.parametrize("impl,chunk", [("chunked", 2), ("chunked", None), ("naive", None), ("auto", 3)])
def test_matches_reference_with_different_hidden_sizes(impl, chunk):
    student, teacher = _qkv(2, 7, 32, 0), _qkv(2, 7, 48, 1)
    loss = MiniLMv2RelationLoss(8, chunk_size=chunk, impl=impl)
    out = loss(student, teacher, _mask())
    ref = minilm_v2_reference(student, teacher, _mask(), 8)
    assert set(out) == {"loss", "qq", "kk", "vv"}
    for key in out:
        torch.testing.assert_close(out[key].double(), ref[key], rtol=1e-5, atol=0)
    torch.testing.assert_close(out["loss"], out["qq"] + out["kk"] + out["vv"])


def test_impl_triton_on_cpu_is_the_chunked_path():
    """Triton runs only on CUDA: on CPU inputs ``impl: triton`` takes the chunked path, says so,
    and gives the chunked path's numbers bit for bit (the Triton kernel itself is tested on a
    GPU below and, in the interpreter, in tests/kernels/test_relation_kl_triton.py)."""
    from toolkit.losses.relations import describe_relation_kl

    student, teacher = _qkv(2, 7, 32, 0), _qkv(2, 7, 48, 1)
    out = MiniLMv2RelationLoss(8, chunk_size=3, impl="triton")(student, teacher, _mask())
    chunked = MiniLMv2RelationLoss(8, chunk_size=3, impl="chunked")(student, teacher, _mask())
    for key in out:
        assert torch.equal(out[key], chunked[key]), key
    assert describe_relation_kl("triton", torch.device("cpu"), 2, 8, 7, chunk_size=3).startswith("chunked")


@pytest.mark.gpu
def test_impl_triton_on_cuda_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("triton")
    student = {k: v.cuda() for k, v in _qkv(2, 7, 32, 0).items()}
    teacher = {k: v.cuda() for k, v in _qkv(2, 7, 48, 1).items()}
    mask = _mask().cuda()
    out = MiniLMv2RelationLoss(8, chunk_size=3, impl="triton")(student, teacher, mask)
    ref = minilm_v2_reference({k: v.cpu() for k, v in student.items()}, {k: v.cpu() for k, v in teacher.items()},
                              _mask(), 8)
    for key in out:
        torch.testing.assert_close(out[key].double().cpu(), ref[key], rtol=1e-4, atol=0)


def test_gradients_flow_to_student_only_and_match_reference():
    student = {k: v.requires_grad_(True) for k, v in _qkv(2, 7, 32, 0).items()}
    teacher = {k: v.requires_grad_(True) for k, v in _qkv(2, 7, 48, 1).items()}
    MiniLMv2RelationLoss(4, chunk_size=3)(student, teacher, _mask())["loss"].backward()
    s64 = {k: v.detach().double().requires_grad_(True) for k, v in student.items()}
    minilm_v2_reference(s64, teacher, _mask(), 4)["loss"].backward()
    for k in "qkv":
        assert teacher[k].grad is None
        torch.testing.assert_close(student[k].grad.double(), s64[k].grad, rtol=1e-4, atol=1e-7)


def test_zero_for_identical_student_and_subset_of_relations():
    teacher = _qkv(2, 7, 32, 3)
    out = MiniLMv2RelationLoss(4)(teacher, {k: v.clone() for k, v in teacher.items()}, _mask())
    assert out["loss"].item() == 0.0
    only_vv = MiniLMv2RelationLoss(4, relations=["VV"])(_qkv(2, 7, 32, 0), teacher, _mask())
    assert set(only_vv) == {"loss", "vv"}
    torch.testing.assert_close(only_vv["loss"], only_vv["vv"])


def test_config_errors():
    with pytest.raises(ConfigError, match="num_relation_heads"):
        MiniLMv2RelationLoss(0)
    with pytest.raises(ConfigError, match="relations"):
        MiniLMv2RelationLoss(4, relations=("qq", "xx"))
    with pytest.raises(ConfigError, match="impl"):
        MiniLMv2RelationLoss(4, impl="cuda")
    with pytest.raises(ConfigError, match="chunk_size"):
        MiniLMv2RelationLoss(4, chunk_size=-2)
    with pytest.raises(ConfigError) as e:
        MiniLMv2RelationLoss(5)(_qkv(2, 7, 32, 0), _qkv(2, 7, 48, 1), _mask())
    assert "num_relation_heads" in str(e.value) and "32" in str(e.value) and "48" in str(e.value)
    with pytest.raises(ToolkitError, match="'v'"):
        MiniLMv2RelationLoss(4)({"q": torch.ones(2, 7, 32), "k": torch.ones(2, 7, 32)}, _qkv(2, 7, 32, 0),
                                _mask())


def test_registry_names():
    from toolkit.losses.minilm_v2 import MiniLMv2Loss

    assert LOSSES["minilmv2"] is MiniLMv2Loss
    assert {"minilm_v1", "tinybert", "logit_kd"} <= set(LOSSES)


def test_describe_relation_kl_names_the_blocks():
    from toolkit.losses.relations import describe_relation_kl

    cpu = torch.device("cpu")
    assert describe_relation_kl("auto", cpu, 16, 12, 512) == "chunked (blocks of 1 sample x 170 query rows)"
    assert describe_relation_kl("chunked", cpu, 32, 12, 128) == "chunked (blocks of 5 samples x 128 query rows)"
    assert describe_relation_kl("auto", cpu, 2, 4, 16, chunk_size=8) == "chunked (blocks of 2 samples x 8 query rows)"
    assert describe_relation_kl("naive", cpu, 2, 4, 16).startswith("naive")
