"""The relation-KL registry: built-in names, ``auto``'s choice, registering and removing one."""
from __future__ import annotations

import pytest
import torch

from toolkit.errors import ConfigError
from toolkit.losses import MiniLMv2RelationLoss, minilm_v2_reference
from toolkit.losses import relation_kl as registry
from toolkit.losses.relation_kl.chunked import relation_kl_qk


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    t, s = torch.randn(2, 7, 48, generator=g), torch.randn(2, 7, 32, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    return t, s, mask


def test_builtin_names_and_auto_on_cpu():
    assert {"auto", "chunked", "naive", "triton"} <= set(registry.relation_kl_names())
    t, s, _ = _inputs()
    # On CPU tensors no built-in beats the chunked path (triton runs on CUDA tensors only).
    assert registry.resolve_relation_kl("auto", t, t, s, s) == "chunked"
    assert registry.resolve_relation_kl("naive", t, t, s, s) == "naive"
    with pytest.raises(ConfigError, match="unknown relation-KL implementation 'fast'.*auto, chunked"):
        registry.resolve_relation_kl("fast", t, t, s, s)


@pytest.mark.parametrize("name", ["chunked", "naive"])
def test_each_builtin_matches_the_reference(name):
    t, s, mask = _inputs()
    got = registry.compute_relation_kl(name, t, t, s, s, mask, 4)
    want = minilm_v2_reference({"q": s}, {"q": t}, mask, 4, relations=("qq",))["qq"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_a_registered_implementation_is_picked_by_auto_where_it_supports_the_tensors():
    calls = []

    def doubled(t_q, t_k, s_q, s_k, mask, heads, chunk=None):
        calls.append(s_q.dtype)
        return 2 * relation_kl_qk(t_q, t_k, s_q, s_k, mask, heads, chunk)

    registry.register_relation_kl("toy", doubled, supports=lambda t_q, t_k, s_q, s_k: s_q.dtype == torch.float32,
                                  priority=5, describe=lambda *_: "toy kernel")
    t, s, mask = _inputs()
    plain = relation_kl_qk(t, t, s, s, mask, 4)
    torch.testing.assert_close(registry.compute_relation_kl("auto", t, t, s, s, mask, 4), 2 * plain)
    # float64 tensors: the toy does not take them, auto falls back to the chunked path.
    torch.testing.assert_close(registry.compute_relation_kl("auto", t.double(), t.double(), s.double(), s.double(),
                                                            mask, 4), plain.double())
    assert calls == [torch.float32]
    assert registry.describe_relation_kl("auto", torch.device("cpu"), 2, 4, 7) == "toy kernel"
    assert registry.describe_relation_kl("auto", torch.device("cpu"), 2, 4, 7, dtype=torch.float64).startswith("chunked")
    # The loss takes the new name (and "auto" finds it); removed, the name is an error again.
    student, teacher = {"q": s}, {"q": t}
    out = MiniLMv2RelationLoss(4, relations=["qq"], impl="toy")(student, teacher, mask)
    torch.testing.assert_close(out["loss"], 2 * plain)
    registry.unregister_relation_kl("toy")
    assert "toy" not in registry.relation_kl_names()
    with pytest.raises(ConfigError, match="impl"):
        MiniLMv2RelationLoss(4, impl="toy")


def test_register_refuses_the_name_auto():
    with pytest.raises(ValueError, match="auto"):
        registry.register_relation_kl("auto", relation_kl_qk)
