"""Labels as matrices: an image's label names against the model's class order."""

from __future__ import annotations

import numpy as np


def label_matrix(labels: list[list[str]], classes: tuple[str, ...]) -> np.ndarray:
    """(N, K) boolean: which known classes each image is labelled with."""
    position = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(labels), len(classes)), dtype=bool)
    for row, names in enumerate(labels):
        for name in names:
            if name in position:
                matrix[row, position[name]] = True
    return matrix
