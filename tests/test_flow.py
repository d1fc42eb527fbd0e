"""The audit end to end: CLI -> Prefect flow -> tables -> report, on tiny generated data."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_shapes, using_prefect_api
from pypdf import PdfReader
from typer.testing import CliRunner

from visaudit.flows.cli import app
from visaudit.tasks.data.images import IMAGENET_MEAN, IMAGENET_STD
from visaudit.tasks.data.storage import SCHEMAS, read_table

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def prefect_server(prefect_api):
    with using_prefect_api(prefect_api):
        yield


def _pdf_text(path) -> str:
    return re.sub(r"\s+", " ", " ".join(page.extract_text() or "" for page in PdfReader(path).pages))


def test_folder_audit_end_to_end(tmp_path, tiny_model_file) -> None:
    data = tmp_path / "data"
    make_shapes(data, {"red": 6, "green": 6, "blue": 2})
    (data / "manifest.csv").unlink()
    (data / "red" / "notes.txt").write_text("not an image")
    jpeg = (data / "green" / "broken.jpg")
    from PIL import Image
    Image.new("RGB", (48, 48), (0, 200, 0)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated JPEG
    model, weights = tiny_model_file
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(data), "--out", str(out), "--model", f"{model}:build",
                                 "--weights", str(weights), "--crop", "48", "--resize", "48",
                                 "--shard-size", "5", "--batch-size", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output

    predictions = read_table(out, "predictions")
    assert len(predictions) == 16 and predictions["image_id"].is_unique
    assert set(SCHEMAS["predictions"].names) | {"run_id"} == set(predictions.columns)
    errors = predictions[predictions["error"].notna()]
    assert sorted(errors["uri"].map(lambda u: u.rsplit("/", 1)[1])) == ["broken.jpg", "notes.txt"]
    good = predictions[predictions["error"].isna()]
    assert good["top_classes"].map(len).eq(3).all() and good["confidence"].between(0, 1).all()
    assert good["correct"].notna().all() and good["loss"].gt(0).all()

    explanations = read_table(out, "explanations")
    assert set(SCHEMAS["explanations"].names) | {"run_id"} == set(explanations.columns)
    predicted = explanations[explanations["is_predicted"]]
    assert predicted["image_id"].nunique() == 14 and len(predicted) == 14, "one predicted-class map per image"
    wrong = good[~good["correct"].astype(bool)]["image_id"]
    labelled = explanations[explanations["is_label"]]
    assert set(wrong) <= set(labelled["image_id"]), "wrong images also get the true-class map"
    assert (explanations["heatmap"].map(len) == explanations["height"] * explanations["width"]).all()

    signals = read_table(out, "signals")
    assert sorted(signals["image_id"]) == sorted(good["image_id"]), "one signal row per readable image"
    probabilities = np.stack(signals["probabilities"])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    top = good.set_index("image_id")["top_scores"].map(lambda s: s[0])
    np.testing.assert_allclose(probabilities.max(axis=1), top.loc[signals["image_id"]].to_numpy(), atol=1e-6)
    assert signals["embedding"].map(len).eq(16).all() and signals["thumbnail"].map(len).eq(192).all()
    assert signals["brightness"].between(0, 1).all()

    findings = read_table(out, "findings")
    assert ((findings["kind"] == "class_imbalance") & (findings["class_name"] == "blue")).any()
    assert findings["confidence"].isin(["normal", "low"]).all()

    run_id = predictions["run_id"].iloc[0]
    run_dir = out / "runs" / run_id
    record = json.loads((run_dir / "run.json").read_text())
    assert record["metrics"]["unreadable"] == 2 and record["classes"] == ["blue", "green", "red"]
    text = _pdf_text(run_dir / "report.pdf")
    for name in ("blue", "green", "red"):
        assert name in text
    for message in findings["message"]:
        assert re.sub(r"\s+", " ", message)[:60] in text
    assert "Sanity check" in text and "Grad-CAM" in text
    features = json.loads((run_dir / "features" / "features.json").read_text())
    assert features["filters"]["layer"] == "0" and len(features["images"]) == 4
    html = (run_dir / "report.html").read_text()
    assert "features/filters.png" in html and all((run_dir / "features" / c["path"]).is_file()
                                                  for image in features["images"] for c in image["channels"])


def test_manifest_with_boxes_scores_energy(tmp_path, tiny_model_file) -> None:
    manifest = make_shapes(tmp_path / "data", {"red": 5, "green": 5, "blue": 5})
    model, weights = tiny_model_file
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(manifest), "--out", str(out), "--model", f"{model}:build",
                                 "--weights", str(weights), "--crop", "48", "--resize", "48", "--no-pdf", "-q",
                                 "--targets", "predicted,true,top5", "--wsl-threshold", "0.2",
                                 "--adversarial-images", "4", "--adversarial-epsilons", "2,8"])
    assert result.exit_code == 0, result.output
    explanations = read_table(out, "explanations")
    energy = explanations["energy_in_box"]
    assert energy.notna().mean() > 0.5, "NaN only for all-zero maps"
    assert energy.dropna().between(0, 1).all()
    assert explanations["pointing_hit"].isna().equals(energy.isna())
    assert explanations["box_area_fraction"].between(0, 1).all()
    predictions = read_table(out, "predictions")
    assert predictions["attributes"].map(dict).map(lambda a: a["background"]).isin(["dark", "light"]).all()
    # explanations under adversarial noise (tests/test_adversarial.py checks the numbers): correct images, each budget
    adversarial = read_table(out, "adversarial")
    right = predictions[predictions["correct"].astype(bool)]
    assert adversarial["image_id"].nunique() == min(4, len(right)) > 0
    assert set(adversarial["image_id"]) <= set(right["image_id"]) and len(adversarial) == 2 * min(4, len(right))
    assert sorted(set((adversarial["epsilon"] * 255).round(3))) == [2.0, 8.0]
    assert (adversarial["linf"] <= adversarial["epsilon"] + 1e-6).all()
    run_dir = out / "runs" / adversarial["run_id"].iloc[0]
    shown = adversarial.dropna(subset=["adversarial_path"])
    assert all((run_dir / path).is_file() for path in [*shown["image_path"], *shown["adversarial_path"]])
    html = (run_dir / "report.html").read_text()
    assert "Explanations under adversarial noise" in html
    assert all(f"<h3>{name}</h3>" in html for name in set(adversarial["target"]))
    # weakly supervised localisation: a box inside the input for every non-empty map, its IoU, and localised
    drawn = explanations[explanations["heatmap"].map(max) > 0]
    box = drawn[["wsl_box_x0", "wsl_box_y0", "wsl_box_x1", "wsl_box_y1"]].to_numpy()
    assert (box[:, :2] >= 0).all() and (box[:, 2:] <= 48).all() and (box[:, 2:] > box[:, :2]).all()
    assert drawn["wsl_iou"].between(0, 1).all()
    judged = explanations[explanations["localised"].notna()]
    assert len(judged) == 15 and judged["is_predicted"].all(), "one predicted-class map per image"
    assert (judged["localised"] == (judged["is_label"] & (judged["wsl_iou"] >= 0.5))).all()
    metrics = read_table(out, "metrics").set_index(["metric", "class_name"], drop=False)
    for name in ("pointing_rate", "pointing_top5_rate", "wsl_error"):
        overall = metrics[(metrics["metric"] == name) & metrics["class_name"].isna()]
        low = metrics[(metrics["metric"] == f"{name}_low") & metrics["class_name"].isna()]["value"].item()
        assert overall["images"].item() == (45 if name == "pointing_top5_rate" else 15)
        assert low <= overall["value"].item() <= 1, name
    wrong = 1 - judged["localised"].astype(bool).mean()
    overall_error = metrics[(metrics["metric"] == "wsl_error") & metrics["class_name"].isna()]["value"].item()
    assert overall_error == pytest.approx(wrong)


def test_second_run_of_a_series_shows_trends_and_changes(tmp_path, tiny_model_file) -> None:
    manifest = make_shapes(tmp_path / "data", {"red": 5, "green": 5, "blue": 5})
    model, weights = tiny_model_file
    out = tmp_path / "out"
    args = ["run", str(manifest), "--out", str(out), "--model", f"{model}:build", "--weights", str(weights),
            "--crop", "48", "--resize", "48", "--no-pdf", "--no-sanity-check", "-q"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    frame = pd.read_csv(manifest)
    frame.loc[frame.index[:3], "label"] = "blue"  # the data changed between the runs: accuracy moves
    frame.to_csv(manifest, index=False)
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    metrics = read_table(out, "metrics")
    accuracy = metrics[metrics["metric"] == "accuracy"].sort_values("run_id")
    assert len(accuracy) == 2 and accuracy["detail"].nunique() == 1, "one series: same model, same source"
    predictions = read_table(out, "predictions")
    for run_id, value in zip(accuracy["run_id"], accuracy["value"]):
        judged = predictions[(predictions["run_id"] == run_id) & predictions["correct"].notna()]
        assert value == pytest.approx(judged["correct"].astype(bool).mean())
    run_ids = sorted(predictions["run_id"].unique())
    first_html = (out / "runs" / run_ids[0] / "report.html").read_text()
    second_html = (out / "runs" / run_ids[1] / "report.html").read_text()
    assert "trends appear from the second run" in first_html
    assert "Since the previous run" in second_html and "images/trends.png" in second_html
    assert (out / "runs" / run_ids[1] / "images" / "trends.png").is_file()
    delta = (accuracy["value"].iloc[1] - accuracy["value"].iloc[0]) * 100
    assert f"Accuracy {delta:+.1f} pp" in second_html


def test_multilabel_audit(tmp_path, tiny_model_file) -> None:
    make_shapes(tmp_path, {"red": 3, "green": 3})
    pd.DataFrame({
        "path": ["red/000.png", "red/001.png", "green/000.png", "green/001.png"],
        "label": ["red;blue", "red", "green;blue", "green"],
    }).to_csv(tmp_path / "multi.csv", index=False)
    model, weights = tiny_model_file
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(tmp_path / "multi.csv"), "--out", str(out), "--model", f"{model}:build",
                                 "--weights", str(weights), "--crop", "48", "--resize", "48", "--no-pdf", "-q"])
    assert result.exit_code == 0, result.output
    predictions = read_table(out, "predictions")
    assert predictions["labels"].map(len).tolist() == [2, 1, 2, 1]
    assert predictions["top_scores"].map(lambda s: all(0 <= v <= 1 for v in s)).all()
    explanations = read_table(out, "explanations")
    multi = explanations[explanations["image_id"] == predictions["image_id"].iloc[0]]
    assert {"red", "blue"} <= set(multi.loc[multi["is_label"], "target"]), "a map for every positive label"


def test_every_method_layer_by_layer_and_named_targets(tmp_path, tiny_model_file) -> None:
    manifest = make_shapes(tmp_path / "data", {"red": 4, "green": 4, "blue": 4})
    model, weights = tiny_model_file
    out = tmp_path / "out"
    methods = "gradcam,gradcam++,xgradcam,layercam,hirescam,counterfactual,cam,guided_backprop,guided_gradcam"
    result = runner.invoke(app, ["run", str(manifest), "--out", str(out), "--model", f"{model}:build",
                                 "--weights", str(weights), "--crop", "48", "--resize", "48", "--no-pdf", "-q",
                                 "--methods", methods, "--layer-by-layer", "--targets", "top2",
                                 "--target-class", "blue"])
    assert result.exit_code == 0, result.output
    explanations = read_table(out, "explanations")
    at_layer = explanations[explanations["layer"] == "3"]
    guided = explanations[explanations["layer"] == "input"]
    assert set(at_layer["method"]) == set(methods.split(",")) - {"guided_backprop", "guided_gradcam"}
    assert set(guided["method"]) == {"guided_backprop", "guided_gradcam"}
    assert guided["height"].eq(48).all() and guided["heatmap"].map(len).eq(48 * 48).all(), "input resolution"
    sanity = read_table(out, "metrics")
    sanity = sanity[sanity["metric"] == "sanity_spearman"]
    assert set(sanity["method"]) == set(methods.split(",")) - {"cam"}
    assert sanity["value"].between(-1, 1).all() and sanity["images"].eq(12).all()
    assert set(explanations.loc[explanations["layer"] == "1", "method"]) == {"gradcam"}, "stages: Grad-CAM only"
    assert explanations.loc[explanations["layer"] == "1", "height"].eq(48).all()
    per_image = at_layer[at_layer["method"] == "gradcam"].groupby("image_id")["target"].agg(set)
    assert len(per_image) == 12 and per_image.map(lambda t: "blue" in t and len(t) >= 2).all()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "{tmp}/missing", "--arch", "resnet18"], "data source not found"),
        (["run", "{data}", "--arch", "resnet-18"], "did you mean resnet18"),
        (["run", "{data}", "--model", "{model}:build", "--weights", "{r34}"], "weights do not fit"),
        (["run", "{data}", "--model", "{model}:build", "--weights", "{weights}", "--batch-size", "0"], "--batch-size"),
        (["run", "{data}", "--arch", "resnet18", "--model", "{model}:build"], "exactly one of --arch"),
        (["run", "{data}", "--model", "{model}:build", "--weights", "{weights}", "--methods", "magic"], "unknown method"),
        (["report", "nope", "--out", "{tmp}"], "no such completed run"),
        (["run", "{data}", "--model", "{model}:build", "--weights", "{weights}", "--methods", "cam", "--layer", "2"],
         "CAM does not apply"),
        (["run", "{data}", "--model", "{model}:build", "--weights", "{weights}", "--target-class", "purple"],
         "not among the model's classes"),
        (["run", "{data}", "--model", "{model}:build", "--weights", "{weights}", "--methods", "impressions",
          "--impression-class", "purple"], "impression class(es) ['purple'] are not among the model's classes"),
        (["run", "{data}", "--model", "{model}:build", "--weights", "{weights}", "--impression-iterations", "0"],
         "--impression-iterations"),
        (["run", "{data}", "--model", "{model}:build", "--weights", "{weights}", "--methods", "impressions",
          "--impression-option", "step=0.1"], "unknown impression option(s) ['step']; available: colour_levels, colour_steps, crop_fraction"),
        (["run", "{data}", "--model", "{model}:build", "--weights", "{weights}", "--methods", "impressions",
          "--impression-option", "objective=softmax"], "objective must be one of"),
        (["run", "{data}", "--model", "{model}:build", "--weights", "{weights}", "--methods", "impressions",
          "--impression-option", "seed=3"], "have their own setting: --impression-seed"),
        (["run", "{data}", "--model", "{model}:build", "--weights", "{weights}", "--impression-option", "lr"],
         "expected NAME=VALUE"),
    ],
)
def test_bad_input_gives_one_line_errors(tmp_path, tiny_model_file, args, expected) -> None:
    import torch
    import torchvision

    data = tmp_path / "data"
    make_shapes(data, {"red": 2, "green": 2, "blue": 2})
    model, weights = tiny_model_file
    r34 = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), r34)
    filled = [a.format(tmp=tmp_path, data=data, model=model, weights=weights, r34=r34) for a in args]
    result = runner.invoke(app, filled + ["--out", str(tmp_path / "out")] if args[0] == "run" else filled)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0]
    assert "Traceback" not in result.output


def test_occlusion_beside_gradcam_with_faithfulness(tmp_path, tiny_model_file) -> None:
    manifest = make_shapes(tmp_path / "data", {"red": 4, "green": 4, "blue": 4})
    model, weights = tiny_model_file
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(manifest), "--out", str(out), "--model", f"{model}:build",
                                 "--weights", str(weights), "--crop", "48", "--resize", "48", "-q",
                                 "--methods", "gradcam,occlusion,mil_patches", "--occlusion-grid", "4",
                                 "--occlusion-baseline", "mean"])
    assert result.exit_code == 0, result.output
    stored = read_table(out, "explanations")
    explanations = stored[stored["method"] == "gradcam"]
    occlusion = read_table(out, "occlusion")
    assert set(SCHEMAS["occlusion"].names) | {"run_id"} == set(occlusion.columns)
    key = ["image_id", "target"]
    assert sorted(map(tuple, occlusion[key].to_numpy())) == sorted(map(tuple, explanations[key].to_numpy())), \
        "one occlusion map per explained (image, target)"
    assert occlusion["height"].eq(4).all() and occlusion["window"].eq(12).all() and occlusion["baseline"].eq("mean").all()
    assert occlusion["heatmap"].map(len).eq(16).all()
    assert occlusion["gradcam_spearman"].dropna().between(-1, 1).all() and occlusion["energy_in_box"].notna().all()
    metrics = read_table(out, "metrics")
    rise = metrics[metrics["metric"].isin(["deletion_auc", "insertion_auc"])]
    assert set(zip(rise["metric"], rise["method"])) == {(m, k) for m in ("deletion_auc", "insertion_auc")
                                                         for k in ("gradcam", "occlusion", "mil_patches")}
    assert rise["value"].between(0, 1).all()
    # mil_patches at 48 px: 12 px patches every 6 px (7 x 7), stored on 8 x 8 cells, one per (image, target)
    patches = stored[stored["method"] == "mil_patches"]
    assert sorted(map(tuple, patches[key].to_numpy())) == sorted(map(tuple, explanations[key].to_numpy()))
    assert patches["layer"].eq("input").all() and patches["height"].eq(8).all() and patches["width"].eq(8).all()
    assert patches["heatmap"].map(min).ge(0).all() and patches["heatmap"].map(max).le(1).all(), "probabilities"
    assert patches["energy_in_box"].notna().all()
    run_dir = out / "runs" / occlusion["run_id"].iloc[0]
    recorded = json.loads((run_dir / "run.json").read_text())["parameters"]["mil_patches"]
    assert recorded == {"patch": 0.25, "stride": 0.125, "patch_px": 12, "stride_px": 6, "patches_per_image": 49}
    text = _pdf_text(run_dir / "report.pdf")
    assert "Grad-CAM against occlusion" in text and "0.254" in text and "deletion AUC" in text
    aucs = rise[rise["method"] == "mil_patches"].set_index("metric")["value"]
    row = f"MIL patches {aucs['deletion_auc']:.2f} {aucs['insertion_auc']:.2f}"
    assert row in re.sub(r"\s+", " ", text), "the mil_patches AUCs in the report's faithfulness table"


def test_occlusion_window_that_does_not_fit_is_one_line(tmp_path, tiny_model_file) -> None:
    manifest = make_shapes(tmp_path / "data", {"red": 2, "green": 2, "blue": 2})
    model, weights = tiny_model_file
    result = runner.invoke(app, ["run", str(manifest), "--out", str(tmp_path / "out"), "--model", f"{model}:build",
                                 "--weights", str(weights), "--crop", "48", "--resize", "48", "-q",
                                 "--methods", "occlusion", "--occlusion-window", "64"])
    assert result.exit_code == 2 and "window" in result.output and "Traceback" not in result.output


def test_class_impressions_in_the_audit(tmp_path, tiny_model_file) -> None:
    manifest = make_shapes(tmp_path / "data", {"red": 3, "green": 5, "blue": 4})
    model, weights = tiny_model_file
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(manifest), "--out", str(out), "--model", f"{model}:build",
                                 "--weights", str(weights), "--crop", "48", "--resize", "48", "-q",
                                 "--methods", "gradcam,impressions", "--impression-iterations", "15",
                                 "--impression-max-classes", "2", "--no-sanity-check",
                                 "--impression-option", "scale=[1, 1.2]", "--impression-option", "objective=logit"])
    assert result.exit_code == 0, result.output
    impressions = read_table(out, "impressions")
    assert set(SCHEMAS["impressions"].names) | {"run_id"} == set(impressions.columns)
    assert impressions["class_name"].tolist() == ["green", "blue"], "the cap keeps the most frequent classes"
    assert impressions["class_index"].tolist() == [1, 0] and impressions["iterations"].eq(15).all()
    assert impressions["probability"].between(0, 1).all() and impressions["layer"].eq("3").all()
    assert (impressions["heatmap"].map(len) == impressions["height"] * impressions["width"]).all()
    run_dir = out / "runs" / impressions["run_id"].iloc[0]
    for path in impressions["image_path"]:
        from PIL import Image

        with Image.open(run_dir / path) as image:
            assert image.size == (48, 48)
    html = (run_dir / "report.html").read_text()
    assert all(path in html for path in impressions["image_path"])
    assert "gradient ascent on the class's logit" in " ".join(html.split())  # the objective chosen
    # colour impressions: the stored probability is the model's for a plain image of the stored colour
    namespace: dict = {}
    exec(model.read_text(), namespace)
    net = namespace["build"](3)
    net.load_state_dict(torch.load(weights, weights_only=True))
    rgb = torch.tensor(impressions[["colour_r", "colour_g", "colour_b"]].to_numpy(dtype="float32")) / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        p = torch.softmax(net.eval()(((rgb.view(-1, 3, 1, 1) - mean) / std).expand(-1, 3, 48, 48)), dim=1)
    own = p[torch.arange(len(impressions)), torch.tensor(impressions["class_index"].to_numpy())]
    assert np.allclose(own.numpy(), impressions["colour_probability"].to_numpy(), atol=1e-5)
    assert all(f"colour alone: {value:.2f}</span>" in html for value in impressions["colour_probability"])
    record = json.loads((run_dir / "run.json").read_text())
    assert record["parameters"]["impressions"]["iterations"] == 15 and "class_impressions" in record["timings"]
    assert record["parameters"]["impressions"]["scale"] == [1, 1.2]
    assert json.loads(impressions["parameters"].iloc[0])["objective"] == "logit"
    text = _pdf_text(run_dir / "report.pdf")
    assert "Class impressions" in text and "Not computed in this run (choose --methods gradcam,impressions)" not in text


def test_layer_by_layer_keeps_one_stage_per_resolution(tmp_path) -> None:
    from visaudit.flows.audit import AuditRequest, prepare_run

    manifest = make_shapes(tmp_path / "data", {"red": 2, "green": 2, "blue": 2, "gray": 2}, size=96)
    plan = prepare_run(AuditRequest(source=str(manifest), out_dir=str(tmp_path / "out"), model="visaudit.tasks.demo.network:build_model",
                                    layer="features.stage3", layer_by_layer=True, crop=96, resize=96))
    # the `features` container outputs stage3's 12x12 map again: it must not appear as a stage of its own
    assert plan.layers == ["features.stem", "features.stage1", "features.stage2", "features.stage3"]


TINY_VIT = '''
import torch
import torchvision


def build(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=num_classes)
    torch.nn.init.normal_(model.heads.head.weight, std=0.2)
    return model
'''


def test_methods_that_cannot_apply_are_skipped_and_the_rest_complete(tmp_path) -> None:
    """A ViT has no global-average-pool + linear head (CAM) and no nn.ReLU (guided backprop):
    both are skipped with their notes in run.json and the report; every other method's maps,
    attention rollout and gradient-weighted rollout among them, are stored for every pair."""
    import html as html_lib

    manifest = make_shapes(tmp_path / "data", {"red": 3, "green": 3, "blue": 3}, size=32)
    factory = tmp_path / "tiny_vit.py"
    factory.write_text(TINY_VIT)
    out = tmp_path / "out"
    methods = ["gradcam", "cam", "guided_backprop", "attention_rollout", "gradient_rollout", "layercam"]
    result = runner.invoke(app, ["run", str(manifest), "--out", str(out), "--model", f"{factory}:build",
                                 "--crop", "32", "--resize", "32", "--no-pdf", "-q", "--no-setup-checks",
                                 "--methods", ",".join(methods), "--sanity-images", "4"])
    assert result.exit_code == 0, result.output
    explanations = read_table(out, "explanations")
    applying = {"gradcam", "attention_rollout", "gradient_rollout", "layercam"}
    assert set(explanations["method"]) == applying
    pairs = explanations.groupby("method").apply(lambda g: frozenset(zip(g["image_id"], g["target"])))
    assert len(pairs.iloc[0]) >= 9 and pairs.map(lambda p: p == pairs.iloc[0]).all(), "every pair, every method"
    assert explanations["heatmap"].map(len).eq(16).all(), "maps on the 4x4 patch grid"
    rollout = explanations[explanations["method"] == "attention_rollout"]
    assert rollout["layer"].eq("attention").all()
    assert rollout.groupby("image_id")["heatmap"].agg(lambda m: len({tuple(h) for h in m}) == 1).all(), \
        "rollout is class-agnostic"
    sanity = read_table(out, "metrics")
    assert {"attention_rollout", "gradient_rollout"} <= set(sanity.loc[sanity["metric"] == "sanity_spearman", "method"])
    run_dir = next(p for p in (out / "runs").iterdir() if not p.name.startswith("."))
    record = json.loads((run_dir / "run.json").read_text())
    skipped = record["model"]["skipped"]
    assert set(skipped) == {"cam", "guided_backprop"}
    assert "global-average-pool + linear" in skipped["cam"] and "nn.ReLU" in skipped["guided_backprop"]
    page = html_lib.unescape((run_dir / "report.html").read_text())
    for note in skipped.values():
        assert note in page
    assert "Attention rollout" in page and "Gradient-weighted rollout" in page


def test_torchscript_archive_audited_without_a_layer(tmp_path, tiny_model_file) -> None:
    """``--arch torchscript:FILE`` audits a scripted CNN end to end: predictions, setup checks,
    occlusion equal to the same eager model's to 1e-5, MIL patch maps, class impressions without a Grad-CAM;
    Grad-CAM skipped with its note; run.json and the report say there is no layer."""
    import html as html_lib
    import warnings

    from visaudit.tasks.model.sources import NO_LAYER

    manifest = make_shapes(tmp_path / "data", {"red": 3, "green": 3, "blue": 3})
    model, weights = tiny_model_file
    namespace: dict = {}
    exec(model.read_text(), namespace)
    net = namespace["build"](3)
    net.load_state_dict(torch.load(weights, weights_only=True))
    archive = tmp_path / "tiny.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        torch.jit.script(net.eval()).save(str(archive))
    common = ["--crop", "48", "--resize", "48", "-q", "--no-pdf", "--occlusion-grid", "4", "--no-sanity-check"]
    scripted, eager = tmp_path / "scripted", tmp_path / "eager"
    result = runner.invoke(app, ["run", str(manifest), "--out", str(scripted), "--arch", f"torchscript:{archive}",
                                 *common, "--methods", "gradcam,occlusion,mil_patches,impressions",
                                 "--impression-iterations", "5", "--impression-max-classes", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["run", str(manifest), "--out", str(eager), "--model", f"{model}:build",
                                 "--weights", str(weights), *common, "--methods", "occlusion", "--no-setup-checks"])
    assert result.exit_code == 0, result.output
    ours, theirs = (read_table(out, "occlusion").sort_values(["image_id", "target"]) for out in (scripted, eager))
    assert len(ours) >= 9 and ours[["image_id", "target"]].values.tolist() == theirs[["image_id", "target"]].values.tolist()
    np.testing.assert_allclose(np.stack(ours["heatmap"]), np.stack(theirs["heatmap"]), atol=1e-5)
    predictions = read_table(scripted, "predictions")
    assert predictions["error"].isna().all() and predictions["confidence"].between(0, 1).all()
    explanations = read_table(scripted, "explanations")
    assert set(zip(explanations["method"], explanations["layer"])) == {("mil_patches", "input")}
    assert len(explanations) == len(ours), "one MIL map per explained (image, target)"
    impressions = read_table(scripted, "impressions")
    assert len(impressions) == 2 and impressions["layer"].eq("").all() and impressions["heatmap"].map(len).eq(0).all()
    metrics = read_table(scripted, "metrics")
    assert set(metrics.loc[metrics["metric"] == "deletion_auc", "method"]) == {"occlusion", "mil_patches"}
    run_dir = scripted / "runs" / predictions["run_id"].iloc[0]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["model"]["layers"] == [] and record["model"]["layer_reason"] == NO_LAYER
    assert record["model"]["skipped"] == {"gradcam": f"Grad-CAM needs hooks on the model's layers; {NO_LAYER}"}
    assert record["setup"]["probe_images"] == 9, "the setup checks ran the scripted model"
    page = html_lib.unescape((run_dir / "report.html").read_text())
    assert f"Explained layer: none ({NO_LAYER})." in page and record["model"]["skipped"]["gradcam"] in page
    assert all(path in page for path in impressions["image_path"])
