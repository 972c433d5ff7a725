"""The order in which training samples are drawn: a permutation per epoch, fixed by the seed.

Within an epoch every sample is drawn exactly once; a draw that crosses the end of an epoch
continues with the next epoch's permutation. The state (epoch, position) is part of the
trainer checkpoint, so a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import torch


class EpochSampler:
    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError("the training set is empty")
        self.num_samples, self.seed = num_samples, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def draw(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(out), self.num_samples - self.position)
            out.extend(self._order[self.position:self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(f"checkpoint sampler state is for {state['num_samples']} samples with seed "
                             f"{state['seed']}; this run has {self.num_samples} with seed {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
