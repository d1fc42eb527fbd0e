"""Validation of the finding detectors on planted-bias datasets (tasks/planted.py).

Trains the demo CNN on the demo recipe (planted biases), on a clean control and on the
clean recipe with one class drawn centred; audits their test splits, and the clean model
again on a manifest with flipped labels and duplicated images; prints one table of
detection (and recall) and false flags per case.

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

import planted

from visaudit.tasks.data.storage import read_table
from visaudit.tasks.demo.recipe import load_recipe
from visaudit.tasks.findings.thresholds import Thresholds


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

    def describe(frame) -> str:
        return "; ".join(
            f"{k} {c if isinstance(c, str) else sl} {v:.3f} ({sev})"
            for k, c, sl, v, sev in zip(frame["kind"], frame["class_name"], frame["slice"], frame["value"], frame["severity"])
        ) or "-"

    def probes(case_out: Path, class_name: str) -> str:
        metrics = read_table(case_out, "metrics")
        rows = metrics[metrics["metric"].str.startswith("fixed_location") & (metrics["class_name"] == class_name)]
        return ", ".join(f"{m.removeprefix('fixed_location_')} {v:.2f}" for m, v in zip(rows["metric"], rows["value"])) or "no candidate"

    data = planted.prepare_case(biased, args.cache, log=lambda line: None)
    _, findings = planted.audit_case(data.data_dir / "test.csv", data.weights, biased, out / "planted", methods)
    expected = [*planted.expected_planted(biased), ("attention_off_object", biased.mark_class, None)]
    for kind, class_name, prefix in expected:
        hit = planted.detected(findings, kind, class_name, prefix)
        what = class_name or prefix.rstrip("=")
        rows.append(("planted", f"{kind} on {what}", "yes" if len(hit) else "NO",
                     f"{hit['value'].iloc[0]:.3f} ({hit['severity'].iloc[0]})" if len(hit) else "-"))
    rows.append(("planted", f"fixed-location probe of {biased.mark_class}", "", probes(out / "planted", biased.mark_class)))
    flags = planted.bias_flags(findings)
    matched = [any(len(planted.detected(flags.loc[[i]], k, c, p)) for k, c, p in expected) for i in flags.index]
    rows.append(("planted", "other bias flags (medium/high)", str(len(flags) - sum(matched)),
                 describe(flags[[not m for m in matched]])))
    rows.append(("planted", "held-out accuracy", f"{data.test_accuracy:.3f}", ""))

    data = planted.prepare_case(clean, args.cache, log=lambda line: None)
    _, findings = planted.audit_case(data.data_dir / "test.csv", data.weights, clean, out / "clean", methods)
    rows.append(("clean", "bias flags (medium/high), want 0", str(len(planted.bias_flags(findings))),
                 describe(planted.bias_flags(findings))))
    rows.append(("clean", "bias flags (low)", str(len(planted.bias_flags(findings, ("low",)))),
                 describe(planted.bias_flags(findings, ("low",)))))
    rows.append(("clean", "held-out accuracy", f"{data.test_accuracy:.3f}", ""))
    clean_data = data

    centred = planted.centred_recipe(biased)
    data = planted.prepare_case(centred, args.cache, log=lambda line: None)
    _, findings = planted.audit_case(data.data_dir / "test.csv", data.weights, centred, out / "centred", methods)
    fixed = findings[findings["kind"] == "attention_fixed_location"]
    rows.append(("centred", f"attention_fixed_location on {centred.centred_class}, want none",
                 str(int((fixed["class_name"] == centred.centred_class).sum())),
                 f"probe: {probes(out / 'centred', centred.centred_class)}"))
    rows.append(("centred", "other flags (any severity)", str(len(findings)), describe(findings)))

    noisy = planted.noisy_manifest(clean_data.data_dir, out / "noisy-data", flip_share=0.1, copies=10)
    predictions, findings = planted.audit_case(noisy.path, clean_data.weights, clean, out / "noisy", methods)
    recall, false_listed = planted.recall_on(findings, "likely_label_error", predictions, noisy.flipped)
    rows.append(("noisy", f"likely_label_error recall ({len(noisy.flipped)} flipped)", f"{recall:.2f}",
                 f"{false_listed} unflipped images listed"))
    contradicted = planted.contradicted(predictions, read_table(out / "noisy", "signals"), noisy.flipped,
                                        clean.classes, Thresholds().label_error_probability)
    rows.append(("noisy", f"likely_label_error recall, flips the model contradicts ({len(contradicted)}: given label <= 5%)",
                 f"{planted.recall_on(findings, 'likely_label_error', predictions, contradicted)[0]:.2f}", ""))
    leak = [p for p in noisy.pairs if p[2]]
    within = [p for p in noisy.pairs if not p[2]]
    rows.append(("noisy", f"near_duplicate leakage recall ({len(leak)} pairs)",
                 f"{planted.pair_recall(findings, predictions, leak):.2f}", ""))
    rows.append(("noisy", f"near_duplicate within-split recall ({len(within)} pairs)",
                 f"{planted.pair_recall(findings, predictions, within):.2f}", ""))
    dupes = findings[findings["kind"] == "near_duplicate"]
    rows.append(("noisy", "near_duplicate pairs reported", str(int(dupes["value"].sum())), f"{len(noisy.pairs)} planted"))

    print("| case | check | result | detail |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{time.perf_counter() - started:.0f} s in all; audits under {out}")


if __name__ == "__main__":
    main()
