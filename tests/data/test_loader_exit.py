"""A job that crashes while its DataLoader workers run still exits: the workers ignore SIGTERM
(so a scheduler's group signal cannot take them down before the rank checkpoints), so the
loader kills them at interpreter exit instead of leaving multiprocessing to wait for them."""
from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import time
    from torch.utils.data import DataLoader, IterableDataset
    import toolkit.data.loader  # noqa: F401  (the exit handler)
    from toolkit.utils.stop_signals import ignore_in_child

    class Forever(IterableDataset):
        def __iter__(self):
            while True:
                time.sleep(0.01)
                yield 1

    items = iter(DataLoader(Forever(), batch_size=None, num_workers=1, worker_init_fn=ignore_in_child))
    next(items)
    raise RuntimeError("boom")
""")


def test_a_crash_with_live_workers_exits_with_its_own_error():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("RuntimeError: boom"), proc.stderr[-2000:]
