"""Tiny data-parallel training run, used by test_launcher.py (and in-process as a reference).

Every optimizer step draws one global batch from a seed; rank r trains on rows
``[r*mb, (r+1)*mb)``, so any world size sees the same data per step and, with gradients
averaged over ranks, follows the same trajectory as one rank with the whole batch.
Rank 0 writes ``result.json`` (per-step global losses, weight checksum) and ``weights.pt``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

import torch
from torch import nn

from toolkit.engine import Engine, OptimConfig
from toolkit.engine import dist


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((self.fc2(torch.tanh(self.norm(self.fc1(x)))) - y) ** 2).mean()


def train(ds_config: Dict[str, Any], steps: int, out: Path) -> Dict[str, Any]:
    engine = Engine(Net(), ds_config, OptimConfig(lr=2e-2, warmup_steps=1), total_steps=steps)
    mb, ws, r = engine.micro_batch_size, engine.world_size, engine.rank
    losses = []
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(mb * ws, 8, generator=g)
        y = x[:, :1] * x[:, 1:2]
        loss = engine(x[r * mb:(r + 1) * mb], y[r * mb:(r + 1) * mb])
        engine.backward(loss)
        engine.step()
        losses.append(float(dist.all_reduce_sum(loss.detach()).item()) / ws)
    sd = engine.consolidated_state_dict()
    result = None
    if engine.is_main:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(sd, out / "weights.pt")
        result = {"world_size": ws, "zero_stage": engine.zero_stage, "global_batch": engine.train_batch_size,
                  "losses": losses, "checksum": float(sum(v.double().abs().sum() for v in sd.values()))}
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ds_config", required=True)
    ap.add_argument("--micro_batch", type=int, required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", required=True)
    args, _ = ap.parse_known_args()  # the deepspeed launcher adds --local_rank
    cfg = json.loads(Path(args.ds_config).read_text())
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
    train(cfg, args.steps, Path(args.out))
    dist.finalize_and_exit(0)


if __name__ == "__main__":
    main()
