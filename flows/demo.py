"""``visaudit demo``: the planted-bias shapes dataset and its small CNN, built (cached) and audited."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from visaudit.tasks.audit.request import AuditRequest
from visaudit.tasks.demo.network import train_model
from visaudit.tasks.demo.recipe import DemoRecipe, generate_dataset, load_recipe

DEMO_METHODS = ["gradcam", "counterfactual", "guided_gradcam", "impressions"]


@dataclass(frozen=True)
class PreparedDemo:
    """The generated dataset, the trained weights, the class file, and the model's held-out accuracy."""

    recipe: DemoRecipe
    data_dir: Path
    weights: Path
    classes_file: Path
    test_accuracy: float


def prepare_demo(cache: Path, log: Callable[[str], None] = print) -> PreparedDemo:
    """Generate the demo dataset and train its model under ``cache`` (both reused when the recipe is unchanged)."""
    recipe = load_recipe()
    log(f"generating the demo dataset in {cache} ...")
    data_dir = generate_dataset(recipe, cache / "data")
    log("training the demo model on the CPU (cached after the first time) ...")
    metrics = train_model(data_dir, recipe, cache / "model.pt", log=log)
    classes_file = cache / "classes.txt"
    classes_file.write_text("\n".join(recipe.classes) + "\n")
    return PreparedDemo(recipe, data_dir, cache / "model.pt", classes_file, float(metrics["test_accuracy"]))


def demo_request(demo: PreparedDemo, out: Path, pdf: bool = True) -> AuditRequest:
    """The audit of the demo's held-out split: Grad-CAM layer by layer, counterfactual, Guided
    Grad-CAM and class impressions, at the recipe's image size."""
    size = demo.recipe.image_size
    return AuditRequest(
        source=str(demo.data_dir / "test.csv"), out_dir=str(out), model="visaudit.tasks.demo.network:build_model",
        weights=str(demo.weights), classes=str(demo.classes_file), resize=size, crop=size, batch_size=64,
        shard_size=100, pdf=pdf, layer="features.stage3", methods=DEMO_METHODS, layer_by_layer=True,
    )
