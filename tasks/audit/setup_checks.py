"""Setup checks: before the shards, does the audit's own setup fit the model?

On a probe of ``probe_images`` labelled images (a fixed-seed sample of the index, decoded
once), the model is scored:

- **preprocessing**: the given preprocessing against alternatives, searched one factor at a
  time (each step keeps the best so far, by mean loss): the size (the images' native size
  when their median shorter side is at most ``native_max`` pixels, 256/224, 224/224, the
  crop alone), then the normalisation (ImageNet mean/std, [0, 1], [-1, 1]), then the
  channel order (RGB, BGR). All alternatives of one size share one uint8 batch; each is
  scored with the outputs assigned to the class names that fit them best (below), so that a
  wrong class order does not pass for a wrong preprocessing;
- **class order**: the probe's confusion matrix ``C[i, j]`` (images of class ``i`` predicted
  as output ``j``) against the best one-to-one assignment of outputs to class names,
  ``argmax_pi sum_i C[i, pi(i)]`` (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``);
- **near chance**: the accuracy's Wilson interval against chance, the share of the most
  common label (a model that always answers it scores that much).

The search is screened: every alternative is scored on the first ``screen_images`` of the
probe (a random subset, the probe being in a fixed-seed random order), and only the screen's
path (each alternative that became the best in turn), where its mean loss there is at most
``screen_loss_ratio`` times the given one's, is scored on the rest of the probe (its screen
forwards are kept), and the best of those by mean loss on the whole probe is the one judged;
the given preprocessing is scored on the whole probe once. A fix must halve the mean loss on the whole probe, so the
screen's looser ratio only spares the forwards of alternatives that cannot pass.

"Clearly better" (an alternative preprocessing, or the assigned class order) takes the
probe's size into account: with ``k_g`` and ``k_a`` of the ``n`` probe images right as given
and with the alternative, Newcombe's hybrid score interval of ``(k_a - k_g) / n`` at
``confidence`` (Bonferroni-corrected over the alternatives tried) must lie above ``min_gain``,
and (preprocessing) the alternative's mean loss must be at most ``max_loss_ratio`` times the
given one's. Multi-label models are judged on exact-match accuracy (all labels right), with a
sigmoid head and the mean binary cross-entropy, and their class order on the matrix of mean
scores ``M[i, j]`` of output ``j`` on the images labelled ``i`` minus its mean elsewhere.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm

from visaudit.tasks.audit.setup_report import ClassOrder, Scored, SetupReport, SetupThresholds, near_chance
from visaudit.tasks.data.batches import normalise
from visaudit.tasks.data.images import NORMALISATIONS, Preprocess, fit, open_rgb
from visaudit.tasks.data.labels import label_matrix
from visaudit.tasks.data.reads import ReadPolicy, read_bytes
from visaudit.tasks.findings.stats import difference_interval
from visaudit.tasks.model.head import Head
from visaudit.tasks.model.loading import LoadedModel

COMMON_SIZES = ((256, 224), (224, 224))


class SetupError(ValueError):
    """The setup does not fit the model; the message names the flags that fix it."""


def probe_sample(index: pd.DataFrame, classes: list[str], count: int) -> pd.DataFrame:
    """Up to ``count`` rows whose labels the model knows, in a fixed-seed random order (so that
    the first ``screen_images`` are a random subset too)."""
    known = set(classes)
    labelled = index[index["labels"].map(lambda names: bool(names) and all(n in known for n in names))]
    return labelled.sample(min(count, len(labelled)), random_state=0)


def run_setup_checks(loaded: LoadedModel, index: pd.DataFrame, classes: list[str], given: Preprocess,
                     multi_label: bool, batch_size: int,
                     thresholds: SetupThresholds = SetupThresholds(),
                     reads: ReadPolicy = ReadPolicy()) -> SetupReport | None:
    """Score the setup on the probe (:func:`stop_if_wrong` judges it), its images read under the
    run's ``reads`` policy; None when fewer than two probe images can be read, or when the model's
    scores on them are not all finite (the shards then record those images' errors)."""
    started = time.perf_counter()
    probe = probe_sample(index, classes, thresholds.probe_images)
    images, rows = _open(probe["uri"].tolist(), reads)
    if len(images) < 2:
        return None
    labels = [list(probe["labels"].iloc[i]) for i in rows]
    targets = torch.from_numpy(label_matrix(labels, tuple(classes)))
    head = Head(multi_label)
    scorer = _Scorer(loaded, images, targets, head, batch_size)
    if not torch.isfinite(scorer.logits(given, len(images))).all():
        return None
    given_scored, scores = scorer.score(given, _normalisation_name(given), len(images))
    screen = min(len(images), thresholds.screen_images)
    path, tried = _search(scorer, given, images, screen, thresholds)
    screen_given = scorer.score(given, given_scored.normalisation, screen)[0].loss
    best = given_scored
    for pre, screened in path:  # each step that improved on the screen, scored on the whole probe when promising
        if screened.loss <= thresholds.screen_loss_ratio * screen_given:
            full = scorer.score(pre, screened.normalisation, len(images))[0]
            best = full if full.loss < best.loss else best
    gain_low = _gain_low(given_scored.assigned, best.assigned, given_scored.images, thresholds.confidence, tried)
    loss_ratio = best.loss / given_scored.loss if given_scored.loss > 0 else float("inf")
    fix = None
    if best != given_scored and gain_low >= thresholds.min_gain and loss_ratio <= thresholds.max_loss_ratio:
        fix = _flags(given, best)
    order = _class_order(given_scored, classes, thresholds)
    keys = [";".join(sorted(names)) for names in labels]
    metric = "exact_match" if multi_label else "accuracy"
    correct = _correct(scores, targets, multi_label)
    return SetupReport(
        probe_images=len(images), metric=metric, given=given_scored, best=best, alternatives=tried,
        screen_images=screen, screen_best=path[-1][1] if path else None,
        gain_low=gain_low, loss_ratio=float(loss_ratio), preprocessing_fix=fix, class_order=order,
        near_chance=near_chance(correct.numpy(), keys, thresholds.confidence, metric),
        seconds=round(time.perf_counter() - started, 3), thresholds=thresholds,
    )


def stop_if_wrong(report: SetupReport) -> None:
    """Raise :class:`SetupError` with the one line that names the fix, for the first check
    (preprocessing, then class order) that found the setup clearly wrong."""
    given, best, n = report.given, report.best, report.probe_images
    if report.preprocessing_fix:
        raise SetupError(
            f"setup check: {report.preprocessing_fix} gives {best.accuracy:.0%} on {n} probe images against "
            f"{given.accuracy:.0%} as given (mean loss {best.loss:.2f} against {given.loss:.2f}): the preprocessing "
            "does not fit the model; pass them, or --no-setup-checks to audit as given")
    order = report.class_order
    if order.wrong:
        raise SetupError(
            f"setup check: the model's outputs look ordered differently from the class names: in the order "
            f"{', '.join(order.suggested[:8])}{', ...' if len(order.suggested) > 8 else ''} they give "
            f"{order.correct_assigned / n:.0%} on {n} probe images against {order.correct_given / n:.0%} as given; "
            "pass --classes FILE with the names in the model's output order, one per line, "
            "or --no-setup-checks to audit as given")


def _open(uris: list[str], reads: ReadPolicy) -> tuple[list[Image.Image], list[int]]:
    """The probe's images decoded once (RGB); unreadable or refused ones are left out (the audit records them)."""
    images, rows = [], []
    for row, uri in enumerate(uris):
        try:
            images.append(open_rgb(read_bytes(uri, reads)))
            rows.append(row)
        except Exception:  # noqa: BLE001 - any decoder failure: the shard records it, the probe skips it
            continue
    return images, rows


class _Scorer:
    """Batched forwards of the probe's first ``count`` images under one preprocessing. The decoded
    images are resized once per size, as far as a call needs them, and each preprocessing's
    logits are kept: scoring more images later runs only the new ones."""

    def __init__(self, loaded: LoadedModel, images: list[Image.Image], targets: torch.Tensor, head: Head,
                 batch_size: int) -> None:
        self.loaded, self.images, self.targets, self.head, self.batch_size = loaded, images, targets, head, batch_size
        self._pixels: dict[tuple[int, int], list[np.ndarray]] = {}
        self._logits: dict[Preprocess, torch.Tensor] = {}

    def _batch(self, resize: int, crop: int, start: int, stop: int) -> torch.Tensor:
        """(stop - start, 3, crop, crop) uint8: the audit's own resize and crop (:func:`fit`)."""
        done = self._pixels.setdefault((resize, crop), [])
        pre = Preprocess(resize=resize, crop=crop)
        done.extend(np.asarray(fit(image, pre)[0], dtype=np.uint8) for image in self.images[len(done):stop])
        return torch.from_numpy(np.stack(done[start:stop])).permute(0, 3, 1, 2).contiguous()

    def logits(self, pre: Preprocess, count: int) -> torch.Tensor:
        """(count, K) logits; RuntimeError when the model refuses the input size."""
        have = self._logits.get(pre, torch.empty(0, self.targets.shape[1]))
        device = self.loaded.device
        parts = [have]
        with torch.inference_mode():
            for start in range(len(have), count, self.batch_size):
                stop = min(count, start + self.batch_size)
                inputs = normalise(self._batch(pre.resize, pre.crop, start, stop).to(device), pre)
                out = self.loaded.model(inputs).float().cpu()
                if out.shape != (stop - start, self.targets.shape[1]):
                    raise RuntimeError(f"the model returned shape {tuple(out.shape)} at {pre.crop} px")
                parts.append(out)
        self._logits[pre] = torch.cat(parts)
        return self._logits[pre][:count]

    def score(self, pre: Preprocess, normalisation: str, count: int) -> tuple[Scored, torch.Tensor]:
        """The preprocessing's record on the first ``count`` probe images and their (count, K)
        probabilities; RuntimeError when the model refuses the input size."""
        scores = self.logits(pre, count)
        multi_label = self.head.multi_label
        probabilities = self.head.probabilities(scores)
        targets = self.targets[:count]
        order = _assignment(probabilities, targets, multi_label)
        assigned = scores[:, torch.from_numpy(order)]
        if multi_label:
            loss = F.binary_cross_entropy_with_logits(assigned, targets.float()).item()
        else:
            loss = F.cross_entropy(assigned, targets.float().argmax(1)).item()
        correct = int(_correct(probabilities, targets, multi_label).sum())
        right = int(_correct(self.head.probabilities(assigned), targets, multi_label).sum())
        return (Scored(pre.resize, pre.crop, normalisation, pre.channels, correct, right, count, loss,
                       order.tolist()), probabilities)


def _search(scorer: _Scorer, given: Preprocess, images: list[Image.Image], count: int,
            thresholds: SetupThresholds) -> tuple[list[tuple[Preprocess, Scored]], int]:
    """One factor at a time on the first ``count`` probe images: size, then normalisation, then
    channels, each step keeping the best so far by mean loss. Returns every alternative that
    became the best in turn (the last is the screen's best; empty when the given one stays best)
    and how many were tried."""
    best_pre, best = given, scorer.score(given, _normalisation_name(given), count)[0]
    tried = 0
    path: list[tuple[Preprocess, Scored]] = []

    def consider(pre: Preprocess, name: str) -> None:
        nonlocal best_pre, best, tried
        if pre in (best_pre, given):
            return
        try:
            scored, _ = scorer.score(pre, name, count)
        except RuntimeError:  # a model that takes one input size only
            return
        tried += 1
        if scored.loss < best.loss:
            best_pre, best = pre, scored
            path.append((pre, scored))

    native = int(np.median([min(image.size) for image in images]))
    sizes = [*([(native, native)] if 8 <= native <= thresholds.native_max else []), *COMMON_SIZES,
             (given.crop, given.crop)]
    for resize, crop in dict.fromkeys(sizes):
        consider(replace(given, resize=resize, crop=crop), best.normalisation)
    base = best_pre
    for name, (mean, std) in NORMALISATIONS.items():
        consider(replace(base, mean=mean, std=std), name)
    base = best_pre
    for channels in ("rgb", "bgr"):
        consider(replace(base, channels=channels), best.normalisation)
    return path, tried


def _normalisation_name(pre: Preprocess) -> str:
    return next((name for name, pair in NORMALISATIONS.items() if pair == (pre.mean, pre.std)), "given")


def _flags(given: Preprocess, best: Scored) -> str:
    """The command-line flags that turn the given preprocessing into ``best``."""
    flags = []
    if (best.resize, best.crop) != (given.resize, given.crop):
        flags.append(f"--resize {best.resize} --crop {best.crop}")
    if best.normalisation != _normalisation_name(given):
        flags.append(f"--normalise {best.normalisation}")
    if best.channels != given.channels:
        flags.append(f"--channels {best.channels}")
    return " ".join(flags)


def _correct(probabilities: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """(N,) bool: top-1 is a true label (multi-class), or every label right at 0.5 (multi-label)."""
    if multi_label:
        return ((probabilities >= 0.5) == targets).all(dim=1)
    return targets.gather(1, probabilities.argmax(1, keepdim=True)).squeeze(1)


def _assignment(probabilities: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> np.ndarray:
    """(K,) the output assigned to each class name: the one-to-one assignment that maximises
    the probe's confusion matrix trace (multi-class) or the outputs' score lift on their class's
    images (multi-label). Ties keep the given order (a small diagonal bonus)."""
    k = targets.shape[1]
    t = targets.double()
    if multi_label:
        scores = probabilities.double()
        inside = (t.T @ scores) / t.sum(0).clamp(min=1)[:, None]
        outside = ((1 - t).T @ scores) / (1 - t).sum(0).clamp(min=1)[:, None]
        matrix = (inside - outside).numpy()
    else:
        predicted = F.one_hot(probabilities.argmax(1), k).double()
        matrix = (t.T @ predicted).numpy()  # C[i, j]: images of class i predicted as output j
    rows, columns = linear_sum_assignment(matrix + 1e-6 * np.eye(k), maximize=True)
    return columns[np.argsort(rows)]


def _gain_low(correct_given: int, correct_other: int, n: int, confidence: float, tests: int) -> float:
    """Lower end of Newcombe's interval of the accuracy gain, Bonferroni-corrected over ``tests``."""
    z = float(norm.ppf(1 - (1 - confidence) / (2 * max(1, tests))))
    return float(difference_interval(np.array(float(correct_given)), np.array(float(n)),
                                     np.array(float(correct_other)), np.array(float(n)), z)[0])


def _class_order(given: Scored, classes: list[str], thresholds: SetupThresholds) -> ClassOrder:
    """The given preprocessing's best assignment of outputs to class names, and whether it is
    clearly better than the given order."""
    order = np.array(given.order)
    gain_low = _gain_low(given.correct, given.assigned, given.images, thresholds.confidence, 1)
    suggested = [classes[i] for i in np.argsort(order)]  # output j's name: the class assigned to it
    identity = bool((order == np.arange(len(order))).all())
    return ClassOrder(given.correct, given.assigned, given.images, gain_low, suggested,
                      not identity and gain_low >= thresholds.min_gain)
