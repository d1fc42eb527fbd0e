"""Timing shared by the benchmarks: warm up twice, alternate the contenders, take medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_all(fns: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each contender over ``reps`` runs, after two warm-up rounds (oneDNN
    builds its kernels on the first calls); the order is reversed every other repetition."""
    for _ in range(2):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps):
        order = list(fns) if rep % 2 == 0 else list(reversed(fns))
        for name in order:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
