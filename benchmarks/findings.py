"""Validation of the finding detectors on planted-bias datasets (tasks/planted.py).

Trains the demo CNN on the demo recipe (planted biases) and on a clean control, audits
both test splits, and the clean model again on a manifest with flipped labels and
duplicated images; prints one table of detection (and recall) and false flags per case.

    PYTHONPATH=. .venv/bin/python benchmarks/findings.py [--cache DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from tasks import planted  # noqa: E402
from tasks.demo import load_recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "visaudit" / "planted")
    parser.add_argument("--out", type=Path, default=None, help="audit output folder (default: a temporary one)")
    parser.add_argument("--methods", default="gradcam,occlusion")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="visaudit-findings-"))
    methods = tuple(m for m in args.methods.split(",") if m)
    started = time.perf_counter()
    biased = load_recipe()
    clean = planted.clean_recipe(biased)
    rows = []

    data = planted.prepare_case(biased, args.cache, log=lambda line: None)
    predictions, findings = planted.audit_case(data.data_dir / "test.csv", data.weights, biased, out / "planted", methods)
    expected = planted.expected_planted(biased)
    for kind, class_name, prefix in expected:
        hit = planted.detected(findings, kind, class_name, prefix)
        what = class_name or prefix.rstrip("=")
        rows.append(("planted", f"{kind} on {what}", "yes" if len(hit) else "NO",
                     f"{hit['value'].iloc[0]:.3f} ({hit['severity'].iloc[0]})" if len(hit) else "-"))
    wanted = {(k, c) for k, c, _ in expected}
    extra = planted.bias_flags(findings)
    extra = extra[[(k, c) not in wanted and not (k == "slice_gap" and str(s).startswith("camera=") or str(s).startswith("mark="))
                   for k, c, s in zip(extra["kind"], extra["class_name"], extra["slice"])]]
    rows.append(("planted", "other bias flags (medium/high)", str(len(extra)),
                 "; ".join(f"{k} {c or s}" for k, c, s in zip(extra["kind"], extra["class_name"], extra["slice"])) or "-"))
    rows.append(("planted", "held-out accuracy", f"{data.test_accuracy:.3f}", ""))

    data = planted.prepare_case(clean, args.cache, log=lambda line: None)
    predictions, findings = planted.audit_case(data.data_dir / "test.csv", data.weights, clean, out / "clean", methods)
    flags = planted.bias_flags(findings)
    rows.append(("clean", "bias flags (medium/high) - want 0", str(len(flags)),
                 "; ".join(f"{k} {c or s} {v:.3f}" for k, c, s, v in zip(flags["kind"], flags["class_name"], flags["slice"], flags["value"])) or "-"))
    low = planted.bias_flags(findings, ("low",))
    rows.append(("clean", "bias flags (low)", str(len(low)),
                 "; ".join(f"{k} {c or s} {v:.3f}" for k, c, s, v in zip(low["kind"], low["class_name"], low["slice"], low["value"])) or "-"))
    rows.append(("clean", "held-out accuracy", f"{data.test_accuracy:.3f}", ""))

    noisy = planted.noisy_manifest(data.data_dir, out / "noisy-data", flip_share=0.1, copies=10)
    predictions, findings = planted.audit_case(noisy.path, data.weights, clean, out / "noisy", methods)
    recall, false_flags = planted.recall_on(findings, "likely_label_error", predictions, noisy.flipped)
    rows.append(("noisy", f"likely_label_error recall ({len(noisy.flipped)} flipped)", f"{recall:.2f}",
                 f"{false_flags} unflipped images listed"))
    leak = [p for p in noisy.pairs if p[2]]
    within = [p for p in noisy.pairs if not p[2]]
    rows.append(("noisy", f"near_duplicate leakage recall ({len(leak)} pairs)",
                 f"{planted.pair_recall(findings, predictions, leak):.2f}", ""))
    rows.append(("noisy", f"near_duplicate within-split recall ({len(within)} pairs)",
                 f"{planted.pair_recall(findings, predictions, within):.2f}", ""))
    dupes = findings[findings["kind"] == "near_duplicate"]
    rows.append(("noisy", "near_duplicate pairs reported", str(int(dupes["value"].sum())),
                 f"{len(noisy.pairs)} planted"))

    print("| case | check | result | detail |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{time.perf_counter() - started:.0f} s in all; audits under {out}")


if __name__ == "__main__":
    main()
