"""Subprocess for the kill test: saves atomic checkpoints in a loop until killed.

Each checkpoint's payload is a tensor filled with its step; the client state records the
step too, so the parent can check that whatever loads is internally consistent. Resumes
from the newest complete checkpoint, as a requeued job would.
"""
from __future__ import annotations

import sys

import torch

from toolkit.engine.checkpoint import find_checkpoint, read_client_state, write_atomic


def main(ckpt_dir: str) -> None:
    found = find_checkpoint(ckpt_dir)
    step = read_client_state(found, 0)["step"] if found is not None else 0
    while True:
        step += 1
        payload = {"w": torch.full((64, 1024), float(step)), "b": torch.full((7,), float(step))}

        def write(tmp, payload=payload):
            torch.save(payload, tmp / "model.pt")
            (tmp / "extra.txt").write_text(str(step) * 1000)

        write_atomic(ckpt_dir, f"step{step}", write, {"step": step}, keep_last=2)


if __name__ == "__main__":
    main(sys.argv[1])
