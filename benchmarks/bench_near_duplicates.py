"""Near-duplicate search at scale: the k-d tree on projected thumbnails against the exact
blocked all-pairs search it replaced (O(N^2)), on synthetic 8x8 RGB thumbnails.

Thumbnails are smooth random images (a 3x3 colour field upsampled to 8x8, the kind of
low-frequency content real thumbnails have), with a share of planted copies (the image
plus noise of 0.005 RMS, as a re-encode gives). Both searches must return the same pairs;
the all-pairs one is only run where it takes minutes, not hours.

    python benchmarks/bench_near_duplicates.py --sizes 5000 20000 100000 1000000 --brute-max 20000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from visaudit.tasks.findings.near_duplicate import close_pairs

MAX_RMS = 0.02  # the detector's default duplicate_pixel_rms


def thumbnails(n: int, copies: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = torch.from_numpy(rng.random((n, 3, 3, 3), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(field, size=(8, 8), mode="bilinear", align_corners=True)
    images = smooth.permute(0, 2, 3, 1).reshape(n, -1).numpy()
    planted = rng.choice(n, int(n * copies), replace=False)
    sources = rng.integers(0, n, len(planted))
    images[planted] = np.clip(images[sources] + rng.normal(0, 0.005, (len(planted), images.shape[1])), 0, 1)
    return images.astype(np.float32)


def all_pairs(vectors: np.ndarray, max_rms: float, block: int = 2048) -> set[tuple[int, int]]:
    """The replaced exact search: blocked cdist over every pair."""
    v = torch.from_numpy(vectors)
    found: set[tuple[int, int]] = set()
    for start in range(0, len(v), block):
        distances = torch.cdist(v[start : start + block], v) / np.sqrt(v.shape[1])
        rows = torch.arange(start, start + len(distances)).unsqueeze(1)
        distances[torch.arange(len(v)).unsqueeze(0) <= rows] = float("inf")
        i, j = (distances <= max_rms).nonzero(as_tuple=True)
        found |= set(zip((i + start).tolist(), j.tolist()))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 100000])
    parser.add_argument("--brute-max", type=int, default=20000)
    parser.add_argument("--copies", type=float, default=0.02)
    args = parser.parse_args()
    print(f"{'N':>9} {'k-d tree s':>11} {'per 1k img ms':>14} {'all-pairs s':>12} {'pairs':>8} {'same pairs':>10}")
    for n in args.sizes:
        data = thumbnails(n, args.copies)
        close_pairs(data[:1000], MAX_RMS)  # warm-up
        t0 = time.perf_counter()
        i, j, _ = close_pairs(data, MAX_RMS)
        tree_s = time.perf_counter() - t0
        brute_s, same = float("nan"), "-"
        if n <= args.brute_max:
            t0 = time.perf_counter()
            reference = all_pairs(data, MAX_RMS)
            brute_s = time.perf_counter() - t0
            same = str(reference == set(zip(i.tolist(), j.tolist())))
        print(f"{n:>9} {tree_s:>11.2f} {1000 * tree_s / n * 1000:>14.2f} {brute_s:>12.2f} {len(i):>8} {same:>10}")


if __name__ == "__main__":
    main()
