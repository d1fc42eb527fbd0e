"""The model's share of a whole ``visaudit`` command: every forward and backward it runs, timed.

    python -m benchmarks.model_clock CLOCK.json run MANIFEST --out OUT ...

runs the command line (``visaudit.flows.cli``) in this process with two clocks added before
visaudit is imported: one around every outermost ``nn.Module`` call (a model's forward, in
whichever step it runs: the setup checks' probe, the shards, the sanity check's randomised
copies, the findings' interventions, deletion/insertion, impressions), and one around every
outermost ``torch.autograd.grad`` / ``backward`` call (Grad-CAM's gradients and the like).
Calls nested in an outer one are not counted again. At exit the totals go to CLOCK.json:
``forward``, ``backward`` and ``model`` seconds (their sum) and the call counts.

Host time: on a CPU it is the model's compute; on a GPU a forward may return before its
kernels finish, so this clock is for CPU runs. ``benchmarks/bench_scale.py --model-clock``
uses it for the small-audit figure of the README.
"""

from __future__ import annotations

import atexit
import functools
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

_depth = threading.local()
_lock = threading.Lock()
totals: dict[str, float] = {"forward": 0.0, "backward": 0.0, "forward_calls": 0, "backward_calls": 0}


def clocked(kind: str, call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` with its outermost calls' seconds added to ``totals[kind]``."""

    @functools.wraps(call)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if getattr(_depth, "inside", False):
            return call(*args, **kwargs)
        _depth.inside = True
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            seconds = time.perf_counter() - start
            _depth.inside = False
            with _lock:
                totals[kind] += seconds
                totals[f"{kind}_calls"] += 1

    return wrapper


def install() -> None:
    torch.nn.Module.__call__ = clocked("forward", torch.nn.Module.__call__)  # type: ignore[method-assign]
    torch.autograd.grad = clocked("backward", torch.autograd.grad)
    torch.autograd.backward = clocked("backward", torch.autograd.backward)  # Tensor.backward calls it


def main() -> None:
    clock_file = Path(sys.argv[1])
    install()

    def write() -> None:
        clock_file.write_text(json.dumps({**totals, "model": totals["forward"] + totals["backward"]}))

    atexit.register(write)
    from visaudit.flows.cli import main as cli

    sys.argv = ["visaudit", *sys.argv[2:]]
    cli()


if __name__ == "__main__":
    main()
