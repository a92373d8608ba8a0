"""Side-by-side timing for the benchmark scripts: interleaved repeats, medians, CUDA-synchronised."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                        warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function, measured alternately so that drift hits all alike.

    Returns every measurement; ``statistics.median`` of each list is the figure to compare.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()  # without it CUDA timings measure only the launch
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)
