"""How much each allocation unit's energy counts: keys against values, and one head against another."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UnitWeights:
    """key_weight: multiplies the energy shares of key components (their errors pass through the softmax);
    head_weights: per layer, ``[key_weights, value_weights]`` with one weight per KV head, or None; power: the
    exponent the head weights are applied at."""

    key_weight: float = 1.0
    head_weights: tuple | list | None = None
    power: float = 1.0

    def of(self, layer_idx: int, key_groups: int, value_groups: int) -> np.ndarray:
        """(key_groups + value_groups,) float64: the weights of a layer's units, key groups first."""
        w = np.array([self.key_weight] * key_groups + [1.0] * value_groups)
        if self.head_weights is not None:
            layer = self.head_weights[layer_idx]
            heads = np.asarray(layer[0][:key_groups] + layer[1][:value_groups])
            w = w * heads**self.power
        return w
