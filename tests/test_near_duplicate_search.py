"""The near-duplicate search is exact: the k-d tree on projected thumbnails finds the same pairs
as comparing every pair, whatever the data (planted copies, pairs at the threshold, tiny sets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visaudit.tasks.findings.near_duplicate import close_pairs


def _every_pair(vectors: np.ndarray, max_rms: float) -> set[tuple[int, int]]:
    v = torch.from_numpy(vectors.astype(np.float64))
    rms = torch.cdist(v, v) / np.sqrt(v.shape[1])
    i, j = torch.triu((rms <= max_rms).to(torch.int8), diagonal=1).nonzero(as_tuple=True)
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_pairs_as_comparing_every_pair(seed: int) -> None:
    rng = np.random.default_rng(seed)
    field = torch.from_numpy(rng.random((1500, 3, 3, 3)))
    images = torch.nn.functional.interpolate(field, size=(8, 8), mode="bilinear").reshape(1500, -1).numpy()
    copies = rng.choice(1500, 60, replace=False)
    images[copies] = images[rng.integers(0, 1500, 60)] + rng.normal(0, 0.01, (60, images.shape[1]))
    edge = images[7] + 0.02 * rng.choice([-1.0, 1.0], images.shape[1])  # exactly at the threshold
    images = np.vstack([images, edge[None]]).astype(np.float32)
    first, second, rms = close_pairs(images, 0.02)
    found = set(zip(first.tolist(), second.tolist()))
    assert found == _every_pair(images, 0.02) and len(found) >= 40
    assert (first < second).all() and (np.diff(rms) >= 0).all() and (rms <= 0.02).all()
    exact = np.sqrt(((images[first].astype(np.float64) - images[second]) ** 2).mean(axis=1))
    assert np.allclose(rms, exact, atol=1e-6)


def test_uint8_thumbnails_pair_as_their_float_copies() -> None:
    """Thumbnails are searched as stored (uint8, the threshold in pixel units): the same pairs,
    and the same differences, as their float copies in [0, 1]."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (3000, 192)).astype(np.uint8)
    copies = rng.choice(3000, 80, replace=False)
    originals = rng.integers(0, 3000, 80)
    pixels[copies] = np.clip(pixels[originals].astype(int) + rng.integers(-6, 7, (80, 192)), 0, 255)
    first, second, rms = close_pairs(pixels, 0.02 * 255)
    assert set(zip(first.tolist(), second.tolist())) == _every_pair(pixels / 255.0, 0.02) and len(first) >= 40
    exact = np.sqrt(((pixels[first].astype(np.float64) - pixels[second]) ** 2).mean(axis=1))
    assert np.allclose(rms, exact, atol=1e-4) and (rms <= 0.02 * 255).all()


@pytest.mark.parametrize("count", [0, 1, 2])
def test_tiny_sets(count: int) -> None:
    vectors = np.zeros((count, 192), np.float32)
    first, second, _ = close_pairs(vectors, 0.02)
    assert list(zip(first.tolist(), second.tolist())) == ([(0, 1)] if count == 2 else [])


def test_many_alike_bound_the_candidates_and_keep_true_pairs(monkeypatch) -> None:
    """A plain-background set pairs as N^2: past the (here lowered) budget the search narrows,
    and with identical thumbnails alone over it returns their first pairs, as comparing every
    pair orders them (RMS 0, then by index)."""
    from visaudit.tasks.findings import near_duplicate

    monkeypatch.setattr(near_duplicate, "CANDIDATE_BUDGET", 2_000)
    monkeypatch.setattr(near_duplicate, "MAX_PAIRS", 100)
    rng = np.random.default_rng(3)
    images = rng.random((1200, 48)).astype(np.float32)
    images[300:500] = images[300] + rng.normal(0, 0.001, (200, 48)).astype(np.float32)  # 19,900 close pairs
    first, second, rms = close_pairs(images, 0.02)
    assert 0 < len(first) <= 100 and set(zip(first.tolist(), second.tolist())) <= _every_pair(images, 0.02)
    assert (first < second).all() and (np.diff(rms) >= 0).all()
    images[100:250] = images[100]  # 11,175 identical pairs: over the budget even at radius 0
    first, second, rms = close_pairs(images, 0.02)
    expected = sorted((i, j) for i, j in _every_pair(images, 0.02) if (images[i] == images[j]).all())[:100]
    assert list(zip(first.tolist(), second.tolist())) == expected and (rms == 0).all()
