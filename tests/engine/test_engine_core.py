"""Single-process Engine: training, accumulation, non-finite skipping, exact resume, ZeRO-3."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from toolkit.engine import Engine, OptimConfig, prepare_frozen
from toolkit.engine.checkpoint import find_checkpoint, is_complete
from toolkit.engine.engine import build_optimizer
from toolkit.errors import ConfigError, ToolkitError, TrainingError


class TinyNet(nn.Module):
    """8 -> 16 -> 1 regression MLP with a LayerNorm (exercises the no-decay group)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.fc2(torch.relu(self.norm(self.fc1(x)))) - y) ** 2).mean()


class TiedNet(nn.Module):
    """Embedding tied to the output projection, like a BERT MLM head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 8)
        self.out = nn.Linear(8, 12, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.out(self.emb(ids)), ids)


def batch(i: int, n: int = 4):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(n, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True) * 0.5


def ds_cfg(stage: int = 0, mb: int = 4, gas: int = 1, clip: float = 0.0) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition even tiny params
    return {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas,
            "zero_optimization": zero, "gradient_clipping": clip}


def run(engine: Engine, micro_batches, start: int = 0):
    losses = []
    for i in range(start, start + micro_batches):
        loss = engine(*batch(i, engine.micro_batch_size))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def test_trains_and_reports_settings():
    e = Engine(TinyNet(), ds_cfg(mb=4, gas=2), OptimConfig(lr=2e-2, warmup_steps=2), total_steps=20)
    assert (e.micro_batch_size, e.grad_accum, e.train_batch_size) == (4, 2, 8)
    assert (e.world_size, e.rank, e.is_main, e.zero_stage) == (1, 0, True, 0)
    assert e.compute_dtype == torch.float32 and e.device == torch.device("cpu")
    x, y = batch(0, 8)
    first = e(x[:4], y[:4]).item()
    for _ in range(15):
        for half in (slice(0, 4), slice(4, 8)):
            e.backward(e(x[half], y[half]))
            e.step()
    assert e.global_step == 15
    assert e(x[:4], y[:4]).item() < 0.5 * first
    assert isinstance(e.module, TinyNet)


def test_no_weight_decay_on_bias_and_layernorm():
    e = Engine(TinyNet(), ds_cfg(), OptimConfig(weight_decay=0.1), total_steps=5)
    groups = e.ds.optimizer.param_groups
    by_decay = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert by_decay == {0.1: 8 * 16 + 16, 0.0: 16 + 16 + 16 + 1}


class HeadNet(TinyNet):
    """TinyNet whose output layer is a task head, as in MultiTaskModel (``model.heads``)."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleDict({"task": self.fc2})
        del self.fc2

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.heads["task"](torch.relu(self.norm(self.fc1(x)))) - y) ** 2).mean()


def test_head_lr_scale_gives_the_heads_their_own_rate():
    e = Engine(HeadNet(), ds_cfg(), OptimConfig(lr=1e-3, head_lr_scale=20, warmup_steps=2, weight_decay=0.1),
               total_steps=4)
    heads = {id(p) for p in e.module.heads.parameters()}

    def rates():
        out = {}
        for g in e.ds.optimizer.param_groups:
            for p in g["params"]:
                out[("head" if id(p) in heads else "body", g["weight_decay"])] = g["lr"]
        return out

    assert rates() == pytest.approx({("body", 0.1): 5e-4, ("body", 0.0): 5e-4,     # warmup: half the peak
                                     ("head", 0.1): 1e-2, ("head", 0.0): 1e-2})
    e.backward(e(*batch(0)))
    e.step()
    assert rates() == pytest.approx({("body", 0.1): 1e-3, ("body", 0.0): 1e-3, ("head", 0.1): 2e-2, ("head", 0.0): 2e-2})
    assert e.lr == pytest.approx(1e-3)   # the reported rate is the encoder's
    # No heads, or parameter groups of the job's own: the setting would do nothing, so it is refused.
    with pytest.raises(ConfigError, match="optim.head_lr_scale.*TinyNet has no task heads"):
        build_optimizer(TinyNet(), OptimConfig(head_lr_scale=10))
    with pytest.raises(ConfigError, match="optim.head_lr_scale"):
        build_optimizer(HeadNet(), OptimConfig(head_lr_scale=10), params=HeadNet().parameters())
    with pytest.raises(ConfigError, match="optim.head_lr_scale"):
        OptimConfig(head_lr_scale=0)


def test_accumulation_boundaries_and_lr_schedule():
    e = Engine(TinyNet(), ds_cfg(gas=3), OptimConfig(lr=1e-2, warmup_steps=2, decay="linear"), total_steps=4)
    flags, steps, lrs = [], [], []
    for i in range(6):
        e.backward(e(*batch(i)))
        flags.append(e.step())
        steps.append(e.global_step)
        lrs.append(e.lr)
    assert flags == [False, False, True, False, False, True]
    assert steps == [0, 0, 1, 1, 1, 2]
    # warmup (s+1)/2: step 0 -> 0.5, after 1 step -> 1.0, after 2 -> linear decay at progress 0
    assert lrs[0] == pytest.approx(5e-3) and lrs[2] == pytest.approx(1e-2) and lrs[5] == pytest.approx(1e-2)


def test_accumulation_equals_large_batch():
    a = Engine(TinyNet(), ds_cfg(mb=4, gas=2), OptimConfig(lr=1e-2), total_steps=10)
    b = Engine(TinyNet(), ds_cfg(mb=8, gas=1), OptimConfig(lr=1e-2), total_steps=10)
    x, y = batch(7, 8)
    for half in (slice(0, 4), slice(4, 8)):
        a.backward(a(x[half], y[half]))
        a.step()
    b.backward(b(x, y))
    b.step()
    for (k, va), vb in zip(a.module.state_dict().items(), b.module.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-6), k


def test_nonfinite_loss_skipped_then_training_error():
    e = Engine(TinyNet(), ds_cfg(), OptimConfig(lr=1e-2), total_steps=10, max_nonfinite=3)
    before = copy.deepcopy(e.module.state_dict())
    for _ in range(2):
        assert e.backward(e(*batch(0)) * float("nan")) is False
        assert e.step() is False
    assert e.global_step == 0 and e.nonfinite_consecutive == 2
    assert all(torch.equal(v, e.module.state_dict()[k]) for k, v in before.items())
    assert e.backward(e(*batch(0))) is True and e.step() is True  # a good one resets the streak
    assert e.nonfinite_consecutive == 0 and e.nonfinite_total == 2 and e.global_step == 1
    for _ in range(2):
        e.backward(e(*batch(1)) * float("inf"))
        e.step()
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        e.backward(e(*batch(1)) * float("nan"))


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_matches_uninterrupted_run(tmp_path, stage):
    optim = OptimConfig(lr=1e-2, warmup_steps=2, decay="cosine", weight_decay=0.01)
    cfg = ds_cfg(stage=stage, gas=2, clip=1.0)
    full = Engine(TinyNet(), cfg, optim, total_steps=6)
    ref_losses = run(full, 12)
    ref = full.consolidated_state_dict()

    first = Engine(TinyNet(), cfg, optim, total_steps=6)
    run(first, 6)
    path = first.save_checkpoint(tmp_path / "ckpt", "step3", {"epoch": 1, "pos": torch.tensor([6])})
    assert is_complete(path) and find_checkpoint(tmp_path / "ckpt") == path

    resumed = Engine(TinyNet(seed=99), cfg, optim, total_steps=6)  # different init: load must overwrite
    state = resumed.load_checkpoint(tmp_path / "ckpt")
    assert state["epoch"] == 1 and torch.equal(state["pos"], torch.tensor([6]))
    assert resumed.global_step == 3 and resumed.lr == pytest.approx(first.lr)
    losses = run(resumed, 6, start=6)
    got = resumed.consolidated_state_dict()
    assert resumed.global_step == full.global_step == 6
    assert losses == pytest.approx(ref_losses[6:], abs=1e-6)
    for k, v in ref.items():
        assert torch.allclose(got[k], v, atol=1e-6), k


def test_load_without_checkpoint_returns_none(tmp_path):
    e = Engine(TinyNet(), ds_cfg(), OptimConfig(), total_steps=2)
    assert e.load_checkpoint(tmp_path / "nothing") is None


def test_save_keeps_last_and_ignores_tmp(tmp_path):
    e = Engine(TinyNet(), ds_cfg(), OptimConfig(lr=1e-2), total_steps=10)
    root = tmp_path / "ckpt"
    for s in range(1, 4):
        run(e, 1, start=s)
        e.save_checkpoint(root, f"step{s}", {"s": s}, keep_last=2)
    (root / ".tmp-step4").mkdir()
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step4", "latest", "step2", "step3"]
    assert e.load_checkpoint(root)["s"] == 3


def test_zero3_consolidated_state_dict_matches_stage0():
    optim = OptimConfig(lr=1e-2)
    z0 = Engine(TinyNet(), ds_cfg(stage=0), optim, total_steps=4)
    z3 = Engine(TinyNet(), ds_cfg(stage=3), optim, total_steps=4)
    run(z0, 3)
    run(z3, 3)
    # Under ZeRO-3 the module's own parameters are empty partitions.
    assert any(p.numel() == 0 for p in z3.module.parameters())
    sd0, sd3 = z0.consolidated_state_dict(), z3.consolidated_state_dict()
    assert list(sd0) == list(sd3)
    for k in sd0:
        assert sd3[k].dtype == torch.float32 and torch.allclose(sd0[k], sd3[k], atol=1e-5), k


def test_zero3_consolidated_keeps_tied_weights():
    e = Engine(TiedNet(), ds_cfg(stage=3), OptimConfig(lr=1e-2), total_steps=2)
    ids = torch.arange(4)
    e.backward(e(ids))
    e.step()
    sd = e.consolidated_state_dict()
    assert set(sd) == {"emb.weight", "out.weight"} and sd["emb.weight"].shape == (12, 8)
    assert torch.equal(sd["emb.weight"], sd["out.weight"])


def test_tiny_bert_trains(tiny_bert_dir):
    from transformers import AutoModel

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = AutoModel.from_pretrained(tiny_bert_dir)
            self.head = nn.Linear(32, 2)

        def forward(self, input_ids, attention_mask, labels):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
            return nn.functional.cross_entropy(self.head(h), labels)

    torch.manual_seed(0)
    ids = torch.randint(5, 100, (8, 12))
    mask = torch.ones_like(ids)
    labels = torch.tensor([0, 1] * 4)
    e = Engine(Classifier(), "ds_configs/cpu_fp32.json", OptimConfig(lr=5e-3), total_steps=12)
    losses = []
    for _ in range(12):
        loss = e(ids, mask, labels)
        e.backward(loss)
        e.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] * 0.5


def test_optim_config_validation():
    with pytest.raises(ConfigError, match="optim.decay"):
        OptimConfig(decay="step")
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=0)
    with pytest.raises(ConfigError, match="optim.impl.*adam8bit.*torch_fused"):
        OptimConfig(impl="adam8bit")


@pytest.mark.parametrize("impl, cls_name, flag", [("auto", "AdamW", "fused"), ("torch_fused", "AdamW", "fused"),
                                                  ("torch_foreach", "AdamW", "foreach"),
                                                  ("deepspeed", "DeepSpeedCPUAdam", None)])
def test_optimizer_impls_take_the_same_step(impl, cls_name, flag):
    """Every optim.impl that runs on CPU builds what it names and moves the weights as torch's
    plain AdamW does (decayed and undecayed groups alike)."""
    ref_net, net = TinyNet(), TinyNet()
    ref = build_optimizer(ref_net, OptimConfig(lr=1e-2, weight_decay=0.1, impl="torch_foreach"))
    opt = build_optimizer(net, OptimConfig(lr=1e-2, weight_decay=0.1, impl=impl))
    assert type(opt).__name__ == cls_name
    if flag:
        assert opt.defaults[flag] is True
    for i in range(3):
        for m, o in ((ref_net, ref), (net, opt)):
            o.zero_grad()
            m(*batch(i)).backward()
            o.step()
    for (name, a), b in zip(ref_net.named_parameters(), net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{impl}: {name} differs from torch AdamW")
    assert not torch.equal(ref_net.fc1.weight, TinyNet().fc1.weight)  # the steps did move the weights


def test_optimizer_impl_errors_say_what_to_use():
    # apex: the PyPI package of that name is unrelated; NVIDIA apex is not installable here.
    with pytest.raises(ConfigError, match="optim.impl.*(apex.optimizers|CUDA)"):
        build_optimizer(TinyNet(), OptimConfig(impl="apex"))


def test_recipe_configs_validate_the_optimizer():
    """Every job reads its AdamW implementation from ``optim.impl``; a bad value and the old
    top-level ``optimizer`` field are errors naming the field."""
    from toolkit.config import load_config
    from toolkit.recipes.distill import DistillConfig
    from toolkit.recipes.evaluate import EvalConfig
    from toolkit.recipes.finetune import FinetuneConfig
    from toolkit.recipes.teacher import TeacherConfig

    for cls, kw in ((DistillConfig, {"teacher": "t"}), (FinetuneConfig, {"model": "m", "task": "sst2"}),
                    (TeacherConfig, {"model": "m", "tasks": ["sst2"]}), (EvalConfig, {"model": "m", "tasks": ["sst2"]})):
        with pytest.raises(ConfigError, match="optim.impl.*sgd"):
            load_config(cls, None, base={**kw, "optim": {"impl": "sgd"}})
        with pytest.raises(ConfigError, match="optim.impl"):
            load_config(cls, None, base={**kw, "optimizer": "deepspeed"})
        assert load_config(cls, None, base={**kw, "optim": {"impl": "deepspeed"}}).optim.impl == "deepspeed"


def test_prepare_frozen():
    m = prepare_frozen(TinyNet(), "cpu", torch.float32)
    assert not m.training and not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("stage", [0, 2])
def test_engine_trains_with_deepspeed_cpu_adam(stage):
    """optim.impl: deepspeed hands DeepSpeed its own CPU Adam; the losses match torch AdamW's."""
    ref = run(Engine(TinyNet(), ds_cfg(stage=stage), OptimConfig(lr=1e-2), total_steps=6), 6)
    e = Engine(TinyNet(), ds_cfg(stage=stage), OptimConfig(lr=1e-2, impl="deepspeed"), total_steps=6)
    assert type(e.ds.optimizer).__name__ in ("DeepSpeedCPUAdam", "DeepSpeedZeroOptimizer")
    losses = run(e, 6)
    assert losses == pytest.approx(ref, rel=1e-4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("stage", [0, 3])
def test_best_weights_go_back_into_the_model(stage):
    """finetune keeps the best step's weights and loads them back for prediction, on every rank;
    under ZeRO-3 into the partitions."""
    e = Engine(TinyNet(), ds_cfg(stage=stage), OptimConfig(lr=1e-2), total_steps=10)
    run(e, 3)
    best = e.consolidated_state_dict(all_ranks=True)
    run(e, 3, start=3)
    later = e.consolidated_state_dict()
    assert any(not torch.equal(best[k], later[k]) for k in best)
    x, y = batch(0)
    ref = TinyNet()
    ref.load_state_dict(best)
    with torch.no_grad():
        assert not torch.allclose(e(x, y), ref(x, y))
        e.load_full_state_dict(best)
        torch.testing.assert_close(e(x, y), ref(x, y))   # the model now computes with the best weights
    if stage < 3:
        with pytest.raises(ToolkitError, match="every rank"):
            e.load_full_state_dict(None)


def test_close_releases_the_engine_and_another_can_follow():
    import gc
    import weakref

    net = TinyNet()
    e = Engine(net, ds_cfg(stage=2), OptimConfig(lr=1e-2), total_steps=4)
    run(e, 2)
    ref = weakref.ref(e.ds)
    e.close()
    e.close()   # idempotent
    del net
    gc.collect()
    assert ref() is None   # nothing keeps DeepSpeed's engine (and its optimizer state) alive
    e2 = Engine(TinyNet(), ds_cfg(stage=2), OptimConfig(lr=1e-2), total_steps=4)
    assert all(math.isfinite(v) for v in run(e2, 2))
