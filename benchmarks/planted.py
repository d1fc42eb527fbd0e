"""Planted-bias validation of the finding detectors (``benchmarks/findings.py`` and the tests).

Each case trains the demo CNN on a generated dataset with known biases, audits its test
split through the real flow, and scores the findings against what was planted:

- ``planted``: the demo recipe. A fixed corner mark on ``mark_class`` ->
  ``attention_fixed_location``; a background colour on ``background_class`` ->
  ``shortcut_property``; an "old camera" slice of the test split -> ``slice_gap`` on
  ``camera``.
- ``clean``: the same generator with no planted bias (marks off, backgrounds uniform, no
  old camera) -> NO bias finding (attention_*, shortcut_property, slice_gap) of severity
  medium or high.
- ``centred``: the clean recipe with one class always drawn at the image centre -> no
  ``attention_fixed_location`` (its peaks cluster, but what sits there varies).
- ``noisy``: the clean model audited on a manifest where a known share of labels are
  flipped and some images are re-encoded copies, within the test split and of training
  images (split=train) -> ``likely_label_error`` recall on the flipped images and
  ``near_duplicate`` recall on the copied pairs (leakage across splits).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from visaudit.tasks.demo.network import train_model
from visaudit.tasks.demo.recipe import DemoRecipe, generate_dataset

BIAS_KINDS = ("attention_off_object", "attention_fixed_location", "shortcut_cue", "shortcut_property", "colour_shortcut",
              "slice_gap", "error_slice")


def clean_recipe(recipe: DemoRecipe) -> DemoRecipe:
    """The same generator with nothing planted: no mark, uniform backgrounds, no old camera."""
    return dataclasses.replace(
        recipe,
        mark_probability=0.0,
        background_probability=1.0 / len(recipe.backgrounds),
        degraded_probability=0.0,
        centred_class="",
    )


def centred_recipe(recipe: DemoRecipe) -> DemoRecipe:
    """The clean recipe with one class (not the mark or background class) always drawn at the
    centre: a location prior, not a mark, that ``attention_fixed_location`` must not flag."""
    centred = next(c for c in recipe.classes if c not in (recipe.mark_class, recipe.background_class))
    return dataclasses.replace(clean_recipe(recipe), centred_class=centred)


@dataclass
class CaseData:
    """A generated dataset and the model trained on it."""

    data_dir: Path
    weights: Path
    test_accuracy: float


def prepare_case(recipe: DemoRecipe, root: Path, log=print) -> CaseData:
    """Generate (cached by fingerprint) and train (cached likewise) one case."""
    from visaudit.tasks.demo.recipe import recipe_fingerprint

    folder = Path(root) / recipe_fingerprint(recipe)
    data_dir = generate_dataset(recipe, folder / "data")
    metrics = train_model(data_dir, recipe, folder / "model.pt", log=log)
    return CaseData(data_dir, folder / "model.pt", metrics["test_accuracy"])


def _jpeg_copy(source: Path, target: Path, quality: int = 90) -> None:
    with Image.open(source) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())


@dataclass
class NoisyManifest:
    path: Path
    flipped: set[str] = field(default_factory=set)  # paths whose label was flipped
    pairs: list[tuple[str, str, bool]] = field(default_factory=list)  # (path, copy path, crosses splits)


def noisy_manifest(
    data_dir: Path, out: Path, flip_share: float = 0.1, copies: int = 10, seed: int = 0
) -> NoisyManifest:
    """The test manifest with ``flip_share`` of its labels flipped to another class, ``copies``
    JPEG re-encodes of test images (split=test) and ``copies`` training images (split=train)
    with a re-encoded copy each in the test split."""
    rng = np.random.default_rng(seed)
    data_dir, out = Path(data_dir), Path(out)
    test = pd.read_csv(data_dir / "test.csv").assign(split="test")
    train = pd.read_csv(data_dir / "train.csv").assign(split="train")
    test["path"] = [str(data_dir / p) for p in test["path"]]
    train["path"] = [str(data_dir / p) for p in train["path"]]
    classes = sorted(test["label"].unique())
    result = NoisyManifest(out / "noisy.csv")
    chosen = rng.choice(len(test), size=copies * 2, replace=False)
    flip_pool = np.setdiff1d(np.arange(len(test)), chosen)
    flips = rng.choice(flip_pool, size=int(round(flip_share * len(test))), replace=False)
    for row in flips:
        current = test.at[row, "label"]
        test.at[row, "label"] = rng.choice([c for c in classes if c != current])
        result.flipped.add(test.at[row, "path"])
    extra = []
    for n, row in enumerate(chosen[:copies]):  # duplicates inside the test split
        record = test.iloc[row].to_dict()
        copy = out / "copies" / f"test_{n:03d}.jpg"
        _jpeg_copy(Path(record["path"]), copy)
        extra.append({**record, "path": str(copy)})
        result.pairs.append((record["path"], str(copy), False))
    for n, row in enumerate(rng.choice(len(train), size=copies, replace=False)):  # train images leaked into test
        record = train.iloc[row].to_dict()
        copy = out / "copies" / f"train_{n:03d}.jpg"
        _jpeg_copy(Path(record["path"]), copy)
        extra.append(record)
        extra.append({**record, "path": str(copy), "split": "test"})
        result.pairs.append((record["path"], str(copy), True))
    frame = pd.concat([test, pd.DataFrame(extra)], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(result.path, index=False)
    return result


def audit_case(
    source: Path,
    weights: Path,
    recipe: DemoRecipe,
    out_dir: Path,
    methods: tuple[str, ...] = ("gradcam",),
    pdf: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Audit ``source`` with the demo model through the flow (HTML report, PDF if asked);
    returns the run's predictions and findings."""
    from visaudit.flows.audit import AuditRequest, audit
    from visaudit.tasks.data.storage import read_table

    classes_file = Path(out_dir) / "classes.txt"
    classes_file.parent.mkdir(parents=True, exist_ok=True)
    classes_file.write_text("\n".join(recipe.classes) + "\n")
    request = AuditRequest(
        source=str(source), out_dir=str(out_dir), model="visaudit.tasks.demo.network:build_model", weights=str(weights),
        classes_file=str(classes_file), resize=recipe.image_size, crop=recipe.image_size,
        layer="features.stage3", methods=list(methods), pdf=pdf, batch_size=64, sanity_images=8,
        allow_outside_paths=True,  # our own noisy manifest names the dataset's images by absolute path
    )
    run_id = audit(request)
    return read_table(out_dir, "predictions", run_id), read_table(out_dir, "findings", run_id)


def pair_recall(findings: pd.DataFrame, predictions: pd.DataFrame, pairs: list[tuple[str, str, bool]]) -> float:
    """Share of the planted duplicate pairs that one near_duplicate finding lists together
    (across-split pairs in the leakage finding, the others in the within-split one)."""
    by_path = dict(zip(predictions["uri"], predictions["image_id"]))
    rows = findings[findings["kind"] == "near_duplicate"]
    found = 0
    for original, copy, crosses in pairs:
        wanted = "leakage" if crosses else "within split"
        listed = {i for ids in rows.loc[rows["slice"] == wanted, "evidence"] for i in ids}
        found += by_path.get(original) in listed and by_path.get(copy) in listed
    return found / len(pairs) if pairs else float("nan")


def bias_flags(findings: pd.DataFrame, severities: tuple[str, ...] = ("medium", "high")) -> pd.DataFrame:
    """Bias findings (attention_*, shortcut_property, slice_gap) of the given severities."""
    return findings[findings["kind"].isin(BIAS_KINDS) & findings["severity"].isin(severities)]


def expected_planted(recipe: DemoRecipe) -> list[tuple[str, str | None, str | None]]:
    """(kind, class_name, slice prefix) that the planted case must raise."""
    return [
        ("attention_fixed_location", recipe.mark_class, None),
        ("shortcut_property", recipe.background_class, None),
        ("slice_gap", None, "camera="),
    ]


def detected(findings: pd.DataFrame, kind: str, class_name: str | None, slice_prefix: str | None) -> pd.DataFrame:
    """The findings matching an expectation."""
    rows = findings[findings["kind"] == kind]
    if class_name is not None:
        rows = rows[rows["class_name"] == class_name]
    if slice_prefix is not None:
        rows = rows[rows["slice"].fillna("").str.startswith(slice_prefix)]
    return rows


def recall_on(findings: pd.DataFrame, kind: str, predictions: pd.DataFrame, planted_paths: set[str]) -> tuple[float, int]:
    """Share of the planted images that a ``kind`` finding lists as evidence, and how many
    listed images were not planted."""
    listed = {i for ids in findings.loc[findings["kind"] == kind, "evidence"] for i in ids}
    by_path = dict(zip(predictions["uri"], predictions["image_id"]))
    planted = {by_path[p] for p in planted_paths if p in by_path}
    hits = len(planted & listed)
    return (hits / len(planted) if planted else float("nan")), len(listed - planted)


def contradicted(predictions: pd.DataFrame, signals: pd.DataFrame, paths: set[str], classes: tuple[str, ...],
                 probability: float) -> set[str]:
    """The images of ``paths`` whose given label the model gives at most ``probability``: the
    wrong labels its probabilities can tell from its own errors (how many depends on the model:
    training is not reproducible across CPUs, and a weaker model half-believes more wrong labels)."""
    frame = predictions[predictions["uri"].isin(paths)].merge(signals[["image_id", "probabilities"]], on="image_id")
    given = [classes.index(labels[0]) for labels in frame["labels"]]
    scores = [float(p[k] / p.sum()) for p, k in zip(frame["probabilities"], given)]
    return {uri for uri, score in zip(frame["uri"], scores) if score <= probability}


def print_table(rows: list[tuple[str, ...]], seconds: float, out: Path) -> None:
    """Print the README's case | check | result | detail table, then the run time and where the audits are."""
    print("| case | check | result | detail |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{seconds:.0f} s in all; audits under {out}")
