"""Each CPU speed-up's share of the distillation and the fine-tuning step, A/B in one process.

Both steps are built as the recipes build them, with ``cpu_accel: auto`` (everything
:func:`toolkit.cpu.accelerate` applies is on):

* **distill**: the truncated frozen teacher (its last layer cut to Q/K/V) under ``no_grad``, the
  student with its MiniLMv2 relation loss (``impl: auto``), backward, fused AdamW;
* **finetune**: the student encoder with a classification head, loss, backward, fused AdamW.

For each ``--switch`` the step alternates blocks of steps with that one speed-up taken off and
put back (the order of the two arms swapped every round), so a shared machine's drift lands in
both arms alike. The share is ``1 - on / off`` (the part of the step without the speed-up that it
saves), reported as the median over rounds. ``--clock wall`` times steps by the wall clock;
``--clock cpu`` by the CPU time of this process (user + system, all threads), which other jobs on
a shared machine disturb far less (with ``--threads 1`` nothing waits for another thread).
Nothing is asserted.

Usage::

    python benchmarks/bench_cpu_accel.py --steps distill,finetune --switches all --rounds 16 --per-arm 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import check_counts, cli_main, cpu_model, load_average, markdown_table, write_json  # noqa: E402

from toolkit.errors import ConfigError  # noqa: E402

STEPS = ("distill", "finetune")
SWITCHES = ("onednn-linears", "relation-kl")
LR, WEIGHT_DECAY = 1e-4, 0.01


def _specs(smoke: bool):
    """(teacher source, student spec, relation heads, vocab): the demo's models, or tiny ones."""
    from toolkit.models.encoder import EncoderSpec

    if smoke:
        tiny = dict(arch="bert", hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=512,
                    max_position_embeddings=128)
        return EncoderSpec(num_layers=2, **tiny), EncoderSpec(num_layers=2, hidden_dropout=0.1, attention_dropout=0.0,
                                                              **tiny), 4, 512
    from toolkit.demo.resources import teacher_dir

    teacher = str(teacher_dir())
    cfg = json.loads((Path(teacher) / "config.json").read_text(encoding="utf-8"))
    vocab = int(cfg["vocab_size"])
    # The demo's student: 3 layers of the teacher's width, the distill recipe's dropout (hidden
    # 0.1, attention 0), which the fine-tuning jobs inherit from the saved student.
    student = EncoderSpec(arch="bert", num_layers=3, hidden_size=384, num_heads=12, intermediate_size=1536,
                          vocab_size=vocab, max_position_embeddings=int(cfg["max_position_embeddings"]),
                          hidden_dropout=0.1, attention_dropout=0.0)
    return teacher, student, 12, vocab


class DistillStep:
    """The distill recipe's step (MiniLMv2 relation loss on the last layers' Q/K/V): the frozen
    teacher cut to what the loss reads, the registered loss and the recipe's ``StudentWithLoss``."""

    def __init__(self, smoke: bool, batch: int, seq: int):
        from toolkit.losses import LossContext, Needs, build_loss
        from toolkit.models.encoder import build_encoder
        from toolkit.recipes.distill import StudentWithLoss
        from toolkit.recipes.frozen import FrozenTeacher

        teacher_src, student_spec, heads, vocab = _specs(smoke)
        torch.manual_seed(0)
        student = build_encoder(student_spec)
        student.pooler.requires_grad_(False)
        t_config = build_encoder(teacher_src).config if not isinstance(teacher_src, str) else None
        if t_config is None:
            from transformers import AutoConfig

            t_config = AutoConfig.from_pretrained(teacher_src, local_files_only=True)
        n = t_config.num_hidden_layers
        ctx = LossContext(t_config, student.config, n - 1, student.config.num_hidden_layers - 1, student=student,
                          field="loss.options.minilmv2")
        loss = build_loss("minilmv2", {"num_relation_heads": heads, "impl": "auto"}, ctx)
        needs = Needs() | loss.needs()
        torch.manual_seed(0)
        self.teacher = FrozenTeacher(teacher_src, needs, torch.device("cpu"), torch.float32)
        self.module = StudentWithLoss(student, nn.ModuleDict({"minilmv2": loss}), {"minilmv2": 1.0}, needs, [1.0])
        self.module.train()
        self.optimizer = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad], lr=LR,
                                           weight_decay=WEIGHT_DECAY, fused=True)
        gen = torch.Generator().manual_seed(1)
        self.batch = {"input_ids": torch.randint(1000 if vocab > 2000 else 5, vocab, (batch, seq), generator=gen),
                      "attention_mask": torch.ones(batch, seq, dtype=torch.long),
                      "token_type_ids": torch.zeros(batch, seq, dtype=torch.long)}
        self.models = {"teacher": (self.teacher.model, False), "student": (self.module, True)}

    def __call__(self) -> None:
        b = self.batch
        t_out = self.teacher(b)
        loss = self.module(b["input_ids"], b["attention_mask"], b["token_type_ids"], teachers=[t_out])["loss"]
        del t_out
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class FinetuneStep:
    """The finetune recipe's step: the student encoder with a new classification head."""

    def __init__(self, smoke: bool, batch: int, seq: int):
        from toolkit.models.encoder import build_encoder
        from toolkit.models.task_model import MultiTaskModel

        _, student_spec, _, vocab = _specs(smoke)
        torch.manual_seed(0)
        self.model = MultiTaskModel(build_encoder(student_spec))
        self.model.add_head("task", "classification", 2, dropout=0.1)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        gen = torch.Generator().manual_seed(1)
        self.batch = {"input_ids": torch.randint(1000 if vocab > 2000 else 5, vocab, (batch, seq), generator=gen),
                      "attention_mask": torch.ones(batch, seq, dtype=torch.long),
                      "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
                      "labels": torch.randint(0, 2, (batch,), generator=gen)}
        self.models = {"model": (self.model, True)}

    def __call__(self) -> None:
        out = self.model("task", **self.batch)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def accelerate_all(step: Any) -> Dict[str, Any]:
    """``cpu_accel: auto`` on every model of the step, as the recipes do; the records."""
    from toolkit.cpu import accelerate

    return {name: accelerate(m, trained=trained, cfg_value="auto") for name, (m, trained) in step.models.items()}


@contextmanager
def switched_off(step: Any, switch: str) -> Iterator[None]:
    """The step with ``switch`` taken off inside the block, put back after it."""
    from toolkit.cpu import onednn, relation
    from toolkit.losses.relation_kl import unregister_relation_kl

    models = list(step.models.values())
    if switch == "onednn-linears":
        for m, _ in models:
            onednn.restore_linears(m)
        yield
        for m, trained in models:
            onednn.use_onednn_linears(m, trainable=trained)
    else:   # relation-kl
        unregister_relation_kl(relation.NAME)
        yield
        relation.register()


def applies(step_name: str, switch: str) -> bool:
    return not (step_name == "finetune" and switch == "relation-kl")


CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def ab_rounds(step: Any, switch: str, rounds: int, per_arm: int, warmup: int, clock: str = "wall") -> Dict[str, Any]:
    """Median step seconds with the switch on and off, blocks of ``per_arm`` steps, order swapped each round."""
    now = CLOCKS[clock]

    def run(arm: str) -> float:
        if arm == "on":
            t0 = now()
            step()
            return now() - t0
        with switched_off(step, switch):
            t0 = now()
            step()
            return now() - t0

    for _ in range(warmup):
        run("on")
        run("off")
    times: Dict[str, List[float]] = {"on": [], "off": []}
    shares = []
    for r in range(rounds):
        this: Dict[str, List[float]] = {"on": [], "off": []}
        for arm in (("on", "off") if r % 2 == 0 else ("off", "on")):
            this[arm] += [run(arm) for _ in range(per_arm)]
        for arm in this:
            times[arm] += this[arm]
        shares.append(1.0 - statistics.median(this["on"]) / statistics.median(this["off"]))
    return summarize(times, shares)


def summarize(times: Dict[str, List[float]], shares: List[float]) -> Dict[str, Any]:
    q = statistics.quantiles(shares, n=4) if len(shares) >= 2 else [shares[0]] * 3
    return {"on_ms": 1e3 * statistics.median(times["on"]), "off_ms": 1e3 * statistics.median(times["off"]),
            "share": statistics.median(shares), "share_q1": q[0], "share_q3": q[2], "round_shares": shares}


def build_step(name: str, args: argparse.Namespace) -> Any:
    return (DistillStep if name == "distill" else FinetuneStep)(args.smoke, args.batch, args.seq)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="distill,finetune", help="comma-separated: distill, finetune")
    p.add_argument("--switches", default="all", help="comma-separated speed-ups to take off one at a time, or all: "
                                                     + ", ".join(SWITCHES))
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--rounds", type=int, default=8, help="rounds of (on, off) blocks per switch")
    p.add_argument("--per-arm", type=int, default=3, help="steps per arm per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per arm first")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                   help="wall: wall-clock time per step; cpu: this process's CPU time per step")
    p.add_argument("--smoke", action="store_true", help="tiny random models (checks the plumbing)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p


def _main(args: argparse.Namespace) -> int:
    check_counts(args, ["rounds", "per_arm", "threads", "batch", "seq"])
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise ConfigError("--steps", f"unknown step {bad or steps}; choose from {', '.join(STEPS)}")
    switches = list(SWITCHES) if args.switches == "all" else [s.strip() for s in args.switches.split(",") if s.strip()]
    bad = [s for s in switches if s not in SWITCHES]
    if bad or not switches:
        raise ConfigError("--switches", f"unknown switch {bad or switches}; choose from all, {', '.join(SWITCHES)}")
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}; seq {args.seq}, batch {args.batch}; "
          f"{args.rounds} rounds x {args.per_arm} steps per arm; {args.clock} clock\n")
    header = ["step", "speed-up taken off", f"step ms ({args.clock}), all on", f"step ms ({args.clock}), without it",
              "share (median of rounds)", "share, quartiles"]
    rows, results = [], []
    for step_name in steps:
        step = None
        records = None
        for switch in switches:
            if not applies(step_name, switch):
                continue
            if step is None:
                step = build_step(step_name, args)
                records = accelerate_all(step)
            r = ab_rounds(step, switch, args.rounds, args.per_arm, args.warmup, args.clock)
            r.update(step=step_name, switch=switch, clock=args.clock, threads=args.threads, loadavg=load_average())
            results.append(r)
            row = [step_name, switch, f"{r['on_ms']:.0f}", f"{r['off_ms']:.0f}", f"{100 * r['share']:+.1f}%",
                   f"{100 * r['share_q1']:+.1f}% .. {100 * r['share_q3']:+.1f}%"]
            rows.append(row)
            print("| " + " | ".join(row) + " |", flush=True)
            if args.json:
                write_json(args.json, {"command": sys.argv, "cpu": cpu_model(), "partial": True, "records": records,
                                       "results": results})
    print()
    print(markdown_table(header, rows))
    if args.json:
        write_json(args.json, {"command": sys.argv, "cpu": cpu_model(), "partial": False, "results": results})
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
