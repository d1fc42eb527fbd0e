"""Partial and moving shortcut cues, and a centred class, on data apart from the demo recipe
(issue 23's validation of ``shortcut_cue``).

Generator: sklearn's handwritten digits 3, 5 and 8, faint, on random crops of scikit-image
textures (grass, brick, gravel; independent of the class), 32 px. Cases, each with a
control trained on the same generator with the bias removed:

- ``watermark`` (the PASCAL horse copyright tag, Lapuschkin et al. 2019): a small "(c)"
  stamp at the bottom-left of 40% of the images of ``three``. Control: the stamp on 40%
  of every class.
- ``token`` (the hospital token, Zech et al. 2018): a letter "R" on a dark tab in a random
  corner of 85% of ``five`` and 10% of the others. Control: on 30% of every class.
- ``centred``: ``eight`` always drawn at the centre (a location prior whose content varies:
  must NOT be flagged). Control: every class at random places.

Each bias is proven on the trained model before the detectors are judged, with the
generator's own stamp (not visaudit's probe): the class's accuracy on its clean test
images with the stamp added and without, and the share of other classes' test images the
stamp turns into the class. One threshold set (the defaults) for every case.

    PYTHONPATH=benchmarks .venv/bin/python benchmarks/cues.py [--cache DIR]

prints the README's table. Data and models are cached under ``--cache`` (default
``~/.cache/visaudit/cues``); each model trains in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import planted
import torch
from general import TrainSettings
from PIL import Image

from visaudit.tasks.demo.network import build_model, to_input, train_model

SIZE = 32
CLASSES = ("three", "five", "eight")
DIGITS = {"three": 3, "five": 5, "eight": 8}
TEXTURES = ("grass", "brick", "gravel")
BIAS_KINDS = (*planted.BIAS_KINDS, "group_gap")

COPYRIGHT = np.array([  # "(c)", 9 x 5
    [0, 1, 0, 0, 1, 1, 0, 1, 0],
    [1, 0, 0, 1, 0, 0, 0, 0, 1],
    [1, 0, 0, 1, 0, 0, 0, 0, 1],
    [1, 0, 0, 1, 0, 0, 0, 0, 1],
    [0, 1, 0, 0, 1, 1, 0, 1, 0],
], dtype=bool)
LETTER_R = np.array([  # "R", 4 x 5, drawn on a 6 x 7 dark tab
    [1, 1, 1, 0],
    [1, 0, 0, 1],
    [1, 1, 1, 0],
    [1, 0, 1, 0],
    [1, 0, 0, 1],
], dtype=bool)


@dataclass(frozen=True)
class Case:
    """Where a case's stamp goes: ``stamp`` is "copyright", "token" or ""; ``rates`` the
    share of each class's images stamped; ``centred`` a class always drawn at the centre."""

    name: str
    stamp: str = ""
    rates: tuple[float, ...] = (0.0, 0.0, 0.0)
    centred: str = ""
    biased: str = ""  # the class the bias is planted on ("" for a control)


CASES = (
    (Case("watermark", "copyright", (0.4, 0.0, 0.0), biased="three"),
     Case("watermark control", "copyright", (0.4, 0.4, 0.4))),
    (Case("token", "token", (0.1, 0.85, 0.1), biased="five"),
     Case("token control", "token", (0.3, 0.3, 0.3))),
    (Case("centred", centred="eight", biased="eight"), Case("centred control")),
)


def _textures() -> dict[str, np.ndarray]:
    from skimage import data, transform

    return {name: transform.resize(getattr(data, name)().astype(np.float64) / 255.0, (128, 128), anti_aliasing=True)
            for name in TEXTURES}


def draw(digit: np.ndarray, texture: np.ndarray, rng: np.random.Generator, centred: bool) -> np.ndarray:
    """A faint white digit (8x8 -> 12-15 px) on a tinted random crop of the texture, float RGB."""
    top, left = rng.integers(0, texture.shape[0] - SIZE, 2)
    tint = rng.uniform(0.4, 0.9, 3)
    tile = texture[top : top + SIZE, left : left + SIZE, None] * tint[None, None, :]
    side = int(rng.integers(12, 16))
    glyph = np.asarray(Image.fromarray((digit / 16.0 * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR))
    y, x = ((SIZE - side) // 2,) * 2 if centred else rng.integers(0, SIZE - side, 2)
    alpha = 0.45 * glyph[..., None] / 255.0
    tile[y : y + side, x : x + side] = tile[y : y + side, x : x + side] * (1 - alpha) + alpha
    return tile


def stamp(tile: np.ndarray, kind: str, corner: int) -> np.ndarray:
    """``tile`` with the stamp: "copyright" at the bottom-left, "token" in ``corner`` (0-3)."""
    out = tile.copy()
    if kind == "copyright":
        h, w = COPYRIGHT.shape
        out[SIZE - h - 2 : SIZE - 2, 2 : 2 + w][COPYRIGHT] = 0.95
    elif kind == "token":
        x = 1 if corner % 2 == 0 else SIZE - 7
        y = 1 if corner < 2 else SIZE - 8
        out[y : y + 7, x : x + 6] = 0.05
        out[y + 1 : y + 6, x + 1 : x + 5][LETTER_R] = 0.95
    return out


def _png(tile: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(tile, 0, 1) * 255).astype(np.uint8))


def generate(case: Case, folder: Path, train_per_class: int = 300, test_per_class: int = 80, seed: int = 0) -> Path:
    """Write train.csv / test.csv (columns path, label, stamp) under ``folder``, and the test
    images without any stamp (``clean_test.npz``) for the intervention."""
    from sklearn.datasets import load_digits

    if (folder / "test.csv").exists():
        return folder
    rng = np.random.default_rng(seed)
    digits = load_digits()
    textures = _textures()
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"train": [], "test": []}
    clean, labels = [], []
    for k, name in enumerate(CLASSES):
        pool = digits.images[digits.target == DIGITS[name]]
        order = rng.permutation(len(pool))
        pools = {"train": pool[order[: int(0.7 * len(pool))]], "test": pool[order[int(0.7 * len(pool)):]]}
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for n in range(count):
                digit = pools[split][rng.integers(len(pools[split]))]
                tile = draw(digit, textures[TEXTURES[rng.integers(len(TEXTURES))]], rng, name == case.centred)
                stamped = bool(case.stamp) and rng.random() < case.rates[k]
                corner = int(rng.integers(4))
                if split == "test":
                    clean.append((np.clip(tile, 0, 1) * 255).astype(np.uint8))
                    labels.append(k)
                path = f"images/{split}_{name}_{n:04d}.png"
                _png(stamp(tile, case.stamp, corner) if stamped else tile).save(folder / path)
                rows[split].append({"path": path, "label": name, "stamp": "yes" if stamped else "no"})
    np.savez_compressed(folder / "clean_test.npz", images=np.stack(clean), labels=np.array(labels))
    for split, frame in rows.items():
        pd.DataFrame(frame).to_csv(folder / f"{split}.csv", index=False)
    return folder


@torch.no_grad()
def intervention(target: str, stamp_kind: str, folder: Path, weights: Path) -> str:
    """The bias proven on the model with the generator's own stamp: ``target``'s accuracy on
    its clean test images with the stamp and without, and the share of the other classes'
    clean test images (not predicted as ``target``) that the stamp turns into it."""
    stored = np.load(folder / "clean_test.npz")
    images, labels = stored["images"], stored["labels"]
    rng = np.random.default_rng(1)
    corners = rng.integers(4, size=len(images))
    with_stamp = np.stack([(np.clip(stamp(im / 255.0, stamp_kind, c), 0, 1) * 255).astype(np.uint8)
                           for im, c in zip(images, corners)])
    model = build_model(len(CLASSES))
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()

    def predict(batch: np.ndarray) -> np.ndarray:
        return model(to_input(torch.from_numpy(batch).permute(0, 3, 1, 2))).argmax(dim=1).numpy()

    k = CLASSES.index(target)
    before, after = predict(images), predict(with_stamp)
    own, others = labels == k, labels != k
    return (f"{target}: accuracy {np.mean(before[own] == k):.2f} without the stamp, {np.mean(after[own] == k):.2f} "
            f"with it; pasting it turns {np.mean(after[others & (before != k)] == k):.2f} of other classes into {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "visaudit" / "cues")
    parser.add_argument("--case", action="append", help="run only this case (repeatable; default: all)")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="visaudit-cues-"))
    started = time.perf_counter()
    settings = dataclasses.replace(TrainSettings(), classes=CLASSES, image_size=SIZE)
    table = []
    for pair in CASES:
        for case in pair:
            if args.case and case.name not in args.case:
                continue
            folder = generate(case, args.cache / case.name.replace(" ", "-"))
            weights = folder / "model.pt"
            metrics = train_model(folder, settings, weights, log=lambda line: None)
            proof = (intervention(pair[0].biased, pair[0].stamp, folder, weights) if pair[0].stamp
                     else f"held-out accuracy {metrics['test_accuracy']:.2f}")
            table.append((case.name, "intervention (generator's stamp)", proof, ""))
            _, findings = planted.audit_case(folder / "test.csv", weights, settings, out / case.name.replace(" ", "-"))
            flags = findings[findings["kind"].isin(BIAS_KINDS) & findings["severity"].isin(("medium", "high"))]
            shown = "; ".join(f"{k} {c} {s} {m} {v:.3f} ({sev})" for k, c, s, m, v, sev in zip(
                flags["kind"], flags["class_name"], flags["slice"], flags["metric"], flags["value"], flags["severity"]))
            table.append((case.name, "bias flags (medium/high)", str(len(flags)), shown or "-"))
            other = findings[~findings["kind"].isin(BIAS_KINDS) & findings["severity"].isin(("medium", "high"))]
            table.append((case.name, "other medium/high rows", str(len(other)),
                          "; ".join(f"{k} {c}" for k, c in zip(other["kind"], other["class_name"])) or "-"))
    planted.print_table(table, time.perf_counter() - started, out)


if __name__ == "__main__":
    main()
