"""The decision loop's layer runner over a real model: one batch's hidden states, advanced in place."""

from __future__ import annotations

import numpy as np


class ModelRunner:
    """Runs layers for any subset of a batch (the samples that asked for the same range) and keeps
    each sample's hidden state, so the next range resumes where the previous one stopped."""

    def __init__(self, model, hidden, mask) -> None:
        self.model = model
        self.hidden = hidden
        self.mask = mask

    def __call__(self, indices: list[int], from_layer: int, to_layer: int, exits) -> list[dict[int, np.ndarray]]:
        import torch
        idx = torch.tensor(indices)
        out, probs = self.model.run(self.hidden[idx], self.mask[idx], from_layer, to_layer, exits)
        self.hidden[idx] = out
        return [{layer: p[j].numpy() for layer, p in probs.items()} for j in range(len(indices))]
