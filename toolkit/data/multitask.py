"""Multi-task batch sampling for the MITKD teacher (MT-DNN style: each batch holds one task).

Task probabilities:
  * ``proportional``: p_i = n_i / sum(n)
  * ``temperature``:  p_i ∝ n_i ** (1 / T)   (T = 1 is proportional, T -> inf is uniform)
  * ``uniform``:      p_i = 1 / K
where n_i is the task's train size after the optional per-task cap.

Everything random here is driven by explicit ``numpy.random.Generator`` objects whose state
is saved in the checkpoint, so a resumed run draws exactly the same task sequence and the
same examples as an uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from toolkit.errors import ConfigError

SAMPLING_MODES = ("proportional", "temperature", "uniform")


def task_probabilities(sizes: Sequence[int], mode: str = "temperature", temperature: float = 2.0,
                       cap: Optional[int] = None) -> np.ndarray:
    """Sampling probability of each task.

    Args:
        sizes: number of training examples per task.
        mode: one of :data:`SAMPLING_MODES`.
        temperature: T for ``temperature`` mode (> 0).
        cap: optional upper bound applied to each size before computing probabilities.
    """
    if mode not in SAMPLING_MODES:
        raise ConfigError("sampling", f"must be one of {list(SAMPLING_MODES)}, got {mode!r}")
    n = np.asarray([min(s, cap) if cap else s for s in sizes], dtype=np.float64)
    if (n <= 0).any():
        raise ConfigError("tasks", "every task needs a non-empty train split")
    if mode == "uniform":
        w = np.ones_like(n)
    elif mode == "proportional":
        w = n
    else:
        if temperature <= 0:
            raise ConfigError("temperature", f"must be > 0, got {temperature}")
        w = n ** (1.0 / temperature)
    return w / w.sum()


class TaskBatchSampler:
    """Draws (task index, example indices) for each micro batch of every rank.

    All ranks draw the same task for a given step (same seed), and rank ``r`` takes the
    ``r``-th slice of that task's next global batch, so ranks never see the same example.
    Each task walks through a seeded permutation of its examples, re-shuffled every epoch.

    Args:
        sizes: train size of each task.
        micro_batch: examples per rank per micro step.
        world_size, rank: data-parallel layout.
        mode, temperature, cap: see :func:`task_probabilities`. ``cap`` also limits how many
            examples of a task are used per epoch (the first ``cap`` of each permutation).
        seed: base seed.
    """

    def __init__(self, sizes: Sequence[int], micro_batch: int, world_size: int = 1, rank: int = 0,
                 mode: str = "temperature", temperature: float = 2.0, cap: Optional[int] = None,
                 seed: int = 0):
        self.sizes = [int(s) for s in sizes]
        self.micro_batch = int(micro_batch)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.cap = cap
        self.probs = task_probabilities(self.sizes, mode, temperature, cap)
        self.seed = seed
        self._task_rng = np.random.default_rng(seed)
        self._perm_rngs = [np.random.default_rng([seed, i]) for i in range(len(self.sizes))]
        self._epoch = [0] * len(self.sizes)
        self._pos = [0] * len(self.sizes)
        self._perm_state: List[Any] = [None] * len(self.sizes)
        self._perms: List[np.ndarray] = [self._new_perm(i) for i in range(len(self.sizes))]
        self.draws = [0] * len(self.sizes)

    def _new_perm(self, i: int) -> np.ndarray:
        # Remember the generator state that produced this permutation: the checkpoint stores
        # that state (small) instead of the permutation (O(task size)).
        self._perm_state[i] = self._perm_rngs[i].bit_generator.state
        perm = self._perm_rngs[i].permutation(self.sizes[i])
        if self.cap:
            perm = perm[: self.cap]
        return perm

    def _take(self, i: int, n: int) -> np.ndarray:
        out = []
        while n > 0:
            avail = len(self._perms[i]) - self._pos[i]
            if avail == 0:
                self._epoch[i] += 1
                self._pos[i] = 0
                self._perms[i] = self._new_perm(i)
                continue
            k = min(n, avail)
            out.append(self._perms[i][self._pos[i]: self._pos[i] + k])
            self._pos[i] += k
            n -= k
        return np.concatenate(out)

    def next(self) -> Dict[str, Any]:
        """The next micro batch for this rank: ``{"task": index, "indices": [...]}``."""
        task = int(self._task_rng.choice(len(self.sizes), p=self.probs))
        global_idx = self._take(task, self.micro_batch * self.world_size)
        mine = global_idx[self.rank * self.micro_batch: (self.rank + 1) * self.micro_batch]
        self.draws[task] += 1
        return {"task": task, "indices": mine.tolist()}

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "task_rng": self._task_rng.bit_generator.state,
            "perm_state": list(self._perm_state),
            "epoch": list(self._epoch),
            "pos": list(self._pos),
            "draws": list(self.draws),
            "sizes": list(self.sizes),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if list(state["sizes"]) != self.sizes:
            raise ConfigError("tasks", f"the checkpoint was made with task sizes {state['sizes']}, "
                              f"but the data now has {self.sizes}; resume with the same tasks and data")
        self._task_rng.bit_generator.state = state["task_rng"]
        for i, (r, s) in enumerate(zip(self._perm_rngs, state["perm_state"])):
            r.bit_generator.state = s
            self._perms[i] = self._new_perm(i)  # regenerates the same permutation
        self._epoch = list(state["epoch"])
        self._pos = list(state["pos"])
        self.draws = list(state["draws"])
