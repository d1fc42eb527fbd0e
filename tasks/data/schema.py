"""The versioned schema of every table, in one place: writers write with it, readers read with it.

New columns are added as nullable, never retyped (older runs then read them as null).
``PROPERTY_COLUMNS`` are the image properties of the ``signals`` table, the candidates of
the shortcut detector.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "2"  # 2: explanations gained the wsl_* and localised columns
PROPERTY_COLUMNS = (  # image properties in the signals table (model-input pixels in [0, 1])
    "mean_r", "mean_g", "mean_b", "brightness", "contrast", "border_r", "border_g", "border_b",
)

_box = [
    pa.field("box_x0", pa.float32()),
    pa.field("box_y0", pa.float32()),
    pa.field("box_x1", pa.float32()),
    pa.field("box_y1", pa.float32()),
]

SCHEMAS: dict[str, pa.Schema] = {
    "predictions": pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("uri", pa.string(), nullable=False),
            pa.field("labels", pa.list_(pa.string())),
            pa.field("predicted", pa.list_(pa.string())),
            pa.field("top_classes", pa.list_(pa.string())),
            pa.field("top_scores", pa.list_(pa.float32())),
            pa.field("confidence", pa.float32()),
            pa.field("correct", pa.bool_()),
            pa.field("loss", pa.float32()),
            pa.field("image_height", pa.int32()),
            pa.field("image_width", pa.int32()),
            *_box,
            pa.field("attributes", pa.map_(pa.string(), pa.string())),
            pa.field("error", pa.string()),
        ]
    ),
    "explanations": pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("method", pa.string(), nullable=False),
            pa.field("layer", pa.string(), nullable=False),
            pa.field("target", pa.string(), nullable=False),
            pa.field("target_index", pa.int32(), nullable=False),
            pa.field("is_predicted", pa.bool_(), nullable=False),
            pa.field("is_label", pa.bool_(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("heatmap", pa.list_(pa.float32()), nullable=False),
            pa.field("peak_row", pa.int32()),
            pa.field("peak_col", pa.int32()),
            pa.field("peak_x", pa.float32()),
            pa.field("peak_y", pa.float32()),
            pa.field("energy_in_box", pa.float32()),
            pa.field("box_area_fraction", pa.float32()),
            pa.field("pointing_hit", pa.bool_()),
            pa.field("wsl_box_x0", pa.float32()),  # weakly supervised localisation: the largest segment's box
            pa.field("wsl_box_y0", pa.float32()),  # (input pixels) at --wsl-threshold of the map's maximum,
            pa.field("wsl_box_x1", pa.float32()),  # NaN without a true box
            pa.field("wsl_box_y1", pa.float32()),
            pa.field("wsl_iou", pa.float32()),  # IoU of that box with the true box
            pa.field("localised", pa.bool_()),  # predicted target, a true label, and wsl_iou >= 0.5
        ]
    ),
    "findings": pa.schema(
        [
            pa.field("kind", pa.string(), nullable=False),
            pa.field("severity", pa.string(), nullable=False),
            pa.field("class_name", pa.string()),
            pa.field("slice", pa.string()),
            pa.field("metric", pa.string(), nullable=False),
            pa.field("value", pa.float64()),
            pa.field("threshold", pa.float64()),
            pa.field("message", pa.string(), nullable=False),
            pa.field("evidence", pa.list_(pa.string())),
            pa.field("confidence", pa.string()),  # "low" when the maps it rests on failed a faithfulness check
            pa.field("cause", pa.string()),  # the finding that explains the same images best (findings.causes)
        ]
    ),
}

SCHEMAS["signals"] = pa.schema(
    [
        # one row per readable image: the numbers the dataset detectors use (tasks/signals.py)
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("probabilities", pa.list_(pa.float32()), nullable=False),  # every class, in class order
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),  # explained layer, global-average-pooled
        pa.field("mean_r", pa.float32()),  # model-input pixels in [0, 1]
        pa.field("mean_g", pa.float32()),
        pa.field("mean_b", pa.float32()),
        pa.field("brightness", pa.float32()),  # mean luma (Rec. 601)
        pa.field("contrast", pa.float32()),  # standard deviation of luma
        pa.field("border_r", pa.float32()),  # mean colour of the outer 1/16 band of the image
        pa.field("border_g", pa.float32()),
        pa.field("border_b", pa.float32()),
        pa.field("thumbnail", pa.list_(pa.uint8()), nullable=False),  # 8x8 RGB, channel-major
    ]
)

SCHEMAS["occlusion"] = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),
        pa.field("target_index", pa.int32(), nullable=False),
        pa.field("is_predicted", pa.bool_(), nullable=False),
        pa.field("is_label", pa.bool_(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),  # the occlusion grid
        pa.field("width", pa.int32(), nullable=False),
        pa.field("heatmap", pa.list_(pa.float32()), nullable=False),  # drop of the target's probability
        pa.field("window", pa.int32(), nullable=False),  # pixels of the model input
        pa.field("stride", pa.int32(), nullable=False),
        pa.field("baseline", pa.string(), nullable=False),
        pa.field("peak_x", pa.float32()),
        pa.field("peak_y", pa.float32()),
        pa.field("energy_in_box", pa.float32()),
        pa.field("box_area_fraction", pa.float32()),
        pa.field("pointing_hit", pa.bool_()),
        pa.field("gradcam_spearman", pa.float32()),  # faithfulness (Grad-CAM paper): NaN without Grad-CAM
    ]
)

SCHEMAS["impressions"] = pa.schema(
    [
        # one row per class impression (tasks/impressions.py): how the model scores it, where its evidence sits
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("logit", pa.float32()),
        pa.field("probability", pa.float32()),  # softmax (sigmoid for multi-label) of the impression's own class
        pa.field("start_probability", pa.float32()),  # the same for the starting noise
        pa.field("competitor_name", pa.string()),  # the most probable other class
        pa.field("competitor_index", pa.int32()),
        pa.field("competitor_probability", pa.float32()),
        pa.field("iterations", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("parameters", pa.string(), nullable=False),  # JSON of the optimisation settings
        pa.field("image_path", pa.string(), nullable=False),  # PNG, relative to runs/<run_id>/
        pa.field("layer", pa.string(), nullable=False),  # where its Grad-CAM is taken
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("heatmap", pa.list_(pa.float32()), nullable=False),  # Grad-CAM of the impression for its class
        pa.field("peak_x", pa.float32()),
        pa.field("peak_y", pa.float32()),
        pa.field("centroid_x", pa.float32()),
        pa.field("centroid_y", pa.float32()),
        pa.field("centroid_offset", pa.float32()),
        pa.field("spread", pa.float32()),
        pa.field("off_centre", pa.bool_()),
        pa.field("colour_r", pa.int32()),  # colour impression: the plain colour that raises the class most
        pa.field("colour_g", pa.int32()),
        pa.field("colour_b", pa.int32()),
        pa.field("colour_probability", pa.float32()),  # the class's probability for a plain image of it
    ]
)

SCHEMAS["metrics"] = pa.schema(
    [
        # long format, one row per run and measured number: trends and quality checks
        pa.field("metric", pa.string(), nullable=False),
        pa.field("method", pa.string()),
        pa.field("layer", pa.string()),
        pa.field("class_name", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("images", pa.int32()),
    ]
)

SCHEMAS["comparisons"] = pa.schema(
    [
        # `visaudit compare A B` (tasks/audit/compare.py): one partition per comparison, run_id = "<A>_vs_<B>"
        pa.field("run_a", pa.string(), nullable=False),
        pa.field("run_b", pa.string(), nullable=False),
        pa.field("section", pa.string(), nullable=False),  # accuracy, flip, finding, explanation, explanation_summary
        pa.field("status", pa.string()),  # flip: fixed/broken; finding: appeared/resolved/kept
        pa.field("image_id", pa.string()),
        pa.field("class_name", pa.string()),  # accuracy: the class (null: every image); flip: the true class
        pa.field("kind", pa.string()),  # finding: its kind (class_name: its class or slice)
        pa.field("method", pa.string()),
        pa.field("layer", pa.string()),
        pa.field("value_a", pa.float64()),  # run A's number: accuracy, confidence, finding value
        pa.field("value_b", pa.float64()),  # run B's
        pa.field("value", pa.float64()),  # explanation: Spearman rho between the runs' maps (summary: the median)
        pa.field("change", pa.float64()),  # accuracy: B - A
        pa.field("low", pa.float64()),  # accuracy: 95% paired interval of the change (Newcombe)
        pa.field("high", pa.float64()),
        pa.field("p_value", pa.float64()),  # accuracy: McNemar's test
        pa.field("images", pa.int32()),
        pa.field("fixed", pa.int32()),  # accuracy: images wrong in A, right in B
        pa.field("broken", pa.int32()),  # accuracy: images right in A, wrong in B
        pa.field("detail", pa.string()),  # accuracy: the test; flip: predictions A -> B; finding: its message
    ]
)

SCHEMAS["adversarial"] = pa.schema(
    [
        # one row per (attacked image, PGD budget) (tasks/explain/adversarial.py); multi-class runs, --adversarial-images
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("target", pa.string(), nullable=False),  # the original class: the clean top-1 (= the label)
        pa.field("target_index", pa.int32(), nullable=False),
        pa.field("clean_confidence", pa.float32()),  # its probability on the clean image
        pa.field("epsilon", pa.float32(), nullable=False),  # L-inf budget, [0, 1] pixel units (before normalisation)
        pa.field("steps", pa.int32(), nullable=False),
        pa.field("step_size", pa.float32(), nullable=False),  # [0, 1] pixel units
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("linf", pa.float32()),  # measured max |adversarial - clean|, pixel units
        pa.field("success", pa.bool_(), nullable=False),  # the top-1 class changed
        pa.field("adversarial_class", pa.string(), nullable=False),  # top-1 on the adversarial image
        pa.field("adversarial_index", pa.int32(), nullable=False),
        pa.field("adversarial_confidence", pa.float32()),  # its probability there
        pa.field("original_probability", pa.float32()),  # the original class's probability there
        pa.field("layer", pa.string(), nullable=False),  # where Grad-CAM is taken
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("clean_heatmap", pa.list_(pa.float32()), nullable=False),  # Grad-CAM, original class, clean image
        pa.field("heatmap", pa.list_(pa.float32()), nullable=False),  # ... original class, adversarial image
        pa.field("adversarial_heatmap", pa.list_(pa.float32())),  # ... adversarial class there (null: attack failed)
        pa.field("spearman", pa.float32()),  # rank correlation of heatmap with clean_heatmap over the map cells
        pa.field("pointing_hit_clean", pa.bool_()),  # pointing game on the box (null: no box)
        pa.field("pointing_hit", pa.bool_()),  # ... of heatmap
        pa.field("pointing_hit_adversarial", pa.bool_()),  # ... of adversarial_heatmap
        pa.field("image_path", pa.string()),  # clean PNG, relative to runs/<run_id>/ (the report's strip)
        pa.field("adversarial_path", pa.string()),  # adversarial PNG (the smallest successful budget's row)
    ]
)


def table_schema(table: str) -> pa.Schema:
    """The current schema of ``table``, tagged with its version in the metadata."""
    try:
        schema = SCHEMAS[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; known tables: {', '.join(SCHEMAS)}") from None
    return schema.with_metadata({"visaudit.table": table, "visaudit.schema_version": SCHEMA_VERSION})
