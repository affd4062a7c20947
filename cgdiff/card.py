"""The Hub model card of a checkpoint, written from its cgdiff.json alone.

`render_model_card(config)` is what `Detector.save_pretrained`, `cgdiff push` and the bundling
script write as README.md: YAML front matter (library, licence, tags, the evaluation results
in the Hub's format), then training, stored settings, calibration, label-free tuning (from
`config["tuning"]`, as `cgdiff.tune` records it) and evaluation. Text only: this module reads
dicts and imports nothing else of the package.
"""

from __future__ import annotations

import math
from typing import Any, Optional

# The settings the tuning section compares, in the order of the tuner's search.
TABLE_KEYS = ("t0", "steps", "w", "guidance_scale", "blur_sigma", "samples", "repaint_t0", "pixel_weight",
              "feature_weight", "map_sigma")
# Settings stored only away from their default (a checkpoint without them reads as before).
TABLE_DEFAULTS = {"samples": 1, "repaint_t0": 0}


def calibration_normals(config: dict[str, Any]) -> Optional[str]:
    """Which normal images the stored calibration used, as its last writer (`cgdiff calibrate`,
    `cgdiff tune` or `cgdiff train`) recorded them in cgdiff.json, e.g. "8 holdout images (not
    used in training)" or "35 training-folder images (in-sample)"; None when none recorded it."""
    return (config.get("calibration_normals") or (config.get("tuning") or {}).get("calibration_normals")
            or (config.get("training") or {}).get("calibration_normals") or None)


def removal_text(metrics: dict[str, Any]) -> Optional[str]:
    """In words, how much of its defects the recorded evaluation's reconstructions take out, from
    `metrics["removal"]` (`cgdiff evaluate` where clean originals exist: 1 - S_rec / S_input, with
    S_rec and S_input the sums over the defect pixels of all evaluated images of
    |reconstruction - clean| and |input - clean|; 1: all of it, 0: none, below 0: the
    reconstruction moved further from the clean image); None when the evaluation did not measure
    it. Below 0.5 (as printed, two decimals) it says plainly that the reconstruction keeps most of
    each defect."""
    removal = metrics.get("removal")
    if not isinstance(removal, (int, float)) or isinstance(removal, bool) or not math.isfinite(removal):
        return None
    shown = round(removal, 2)
    share = f"{100 * shown:.0f} %" if shown > 0 else "none"
    text = (f"At the stored settings its reconstruction takes out {share} of the evaluated defects' difference "
            f"from the clean image (removal {shown:.2f}; 1: all of it, 0: none).")
    if shown < 0.5:
        text += (" It keeps most of each defect: the map finds defects through the differences that remain, so do "
                 "not expect the reconstruction to show the defect gone.")
    return text


def render_model_card(config: dict[str, Any], repo_name: str = "cgdiff detector") -> str:
    """A Hub model card (YAML front matter + prose) from a checkpoint's cgdiff.json."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    training = config.get("training", {}) or {}
    metrics = config.get("metrics", {}) or {}
    dataset_name = str(metrics.get("dataset") or training.get("data") or "unknown")
    eval_results = []
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"):
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            eval_results.append(
                EvalResult(
                    task_type="image-segmentation",
                    task_name="Texture anomaly detection and localisation",
                    dataset_type="custom",
                    dataset_name=dataset_name,
                    dataset_split=str(metrics.get("split", "test")),
                    metric_type=key,
                    metric_name=key.replace("_", " "),
                    metric_value=round(float(value), 4),
                )
            )
    card_data = ModelCardData(
        library_name="cgdiff",
        license=config.get("license", "apache-2.0"),
        tags=["anomaly-detection", "diffusion", "ddim", "texture", "cgdiff"],
        pipeline_tag="image-segmentation",
        model_name=repo_name,
        eval_results=eval_results or None,
    )
    sampler = config.get("sampler", {})
    scorer = config.get("scorer", {})
    calibration = config.get("calibration", {}) or {}
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {repo_name}",
        "",
        "A texture anomaly detector made with cgdiff: a diffusion model trained",
        "on normal images only reconstructs each image from a partially noised start, conditioned on the",
        "image itself and steered away from a blurred copy of its own estimate (blur guidance); the pixel",
        "and feature difference between the image and its reconstruction localises defects.",
        *(["Then a second pass paints the pixels the first map marks over with the denoiser, from the input",
           f"noised to t2 = {sampler['repaint_t0']}, keeping the rest of the image (RePaint-style); the second",
           "reconstruction is the one scored."] if sampler.get("repaint_t0") else []),
        "",
        "```python",
        "from cgdiff import Detector",
        f'detector = Detector.from_pretrained("{config.get("hub_repo_id") or "path/to/this/folder"}")',
        'result = detector.detect("image.png")[0]',
        "print(result.score, result.is_anomalous)",
        "```",
        "",
        "## Training",
        "",
    ]
    for key in ("data", "description", "image_size", "crop_size", "unet_preset", "parameters", "steps", "batch_size",
                "learning_rate", "seconds", "device", "command"):
        if key in training:
            value = training[key]
            if key == "command":
                lines.append(f"- {key}: `{value}`")
            elif key == "learning_rate":
                run = training.get("config") or {}
                schedule = run.get("lr_schedule", "constant")
                warmup = run.get("warmup_steps", 0)
                lines.append(f"- {key}: {value} ({schedule}" + (f", {warmup} warm-up steps)" if warmup else ")"))
            else:
                lines.append(f"- {key}: {value}")
    share = (training.get("config") or {}).get("noise_to_norm")
    if share:
        lines.append(f"- noise-to-norm: {share:g} of the training crops corrupted and trained towards the clean crop "
                     "(min-SNR-5 weighted)")
    holdout = training.get("holdout") or {}
    if holdout.get("images"):
        lines.append(f"- held out of training, for tuning and the threshold: {', '.join(holdout['images'])}")
    if holdout.get("overlapping_left_out"):
        lines.append("- left out of training too, as they overlap the held-out tiles: "
                     + ", ".join(holdout["overlapping_left_out"]))
    lines += ["", "## Settings stored in the checkpoint", "", f"- image size: {config.get('image_size')}"]
    lines.append("- sampler: " + ", ".join(f"{k}={v}" for k, v in sampler.items()))
    lines.append("- scorer: " + ", ".join(f"{k}={v}" for k, v in scorer.items()))
    if calibration:
        normals = (calibration_normals(config)
                   or f"{calibration.get('n_images')} normal images (which ones is not recorded)")
        lines.append(
            f"- calibration on {normals}: pixel scale c = "
            f"{calibration.get('pixel_scale', 0):.4g}, threshold = {calibration.get('threshold', 0):.4g}"
            f"; threshold set by {threshold_rule_text(calibration)}"
        )
        if config.get("calibration_command"):
            lines.append(f"- recalibrated with: `{config['calibration_command']}`")
    tuning = config.get("tuning")
    if tuning:
        lines += ["", "## Label-free tuning", "", *model_card_section(tuning)]
    if metrics:
        lines += ["", "## Evaluation", ""]
        if metrics.get("description"):
            lines += [str(metrics["description"]), ""]
        lines += ["| metric | value |", "|---|---|"]
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "removal", "fidelity",
                    "seconds_per_image", "n_images"):
            if isinstance(metrics.get(key), (int, float)):
                lines.append(f"| {key} | {metrics[key]:.4g} |")
        # The verdict rates only while they belong to the stored threshold.
        at = (metrics.get("at_threshold") or {}) if metrics.get("threshold") == calibration.get("threshold") else {}
        for key, label, n in (("true_positive_rate", "anomalous images flagged at the threshold", "n_anomalous"),
                              ("false_positive_rate", "normal images flagged at the threshold", "n_normal")):
            if isinstance(at.get(key), (int, float)):
                count = metrics.get(n)
                share = f"{100 * at[key]:.0f} %"
                lines.append(f"| {label} | {round(at[key] * count)} of {count} ({share}) |" if isinstance(count, int)
                             else f"| {label} | {share} |")
        removal = removal_text(metrics)
        if removal:
            lines += ["", removal]
        if metrics.get("command"):
            lines += ["", "Reproduce with:", "", "```bash", str(metrics["command"]), "```"]
    lines += ["", "## Limits", "",
              "Trained on the data above only: other textures, scales or lighting need their own model. The",
              "threshold was set on the images named above (normal ones, and synthetic defects where the rule",
              "says so), not on real defects: check it on your own normal and defective samples before relying",
              "on the verdict (`cgdiff calibrate` sets it again).", ""]
    return ModelCard("\n".join(lines)).content


def threshold_rule_text(calibration: dict[str, Any]) -> str:
    """How the stored threshold was set, in words (cgdiff.scorer's threshold rules), with what
    it flags of the images it was set on."""
    threshold = calibration.get("threshold", 0)
    normal = calibration.get("normal_scores") or []
    defects = calibration.get("anomalous_scores") or []
    flags = (f"; it flags {sum(v > threshold for v in normal)} of the {len(normal)} normal and "
             f"{sum(v > threshold for v in defects)} of the {len(defects)} defect images" if normal and defects else "")
    if calibration.get("threshold_rule") == "validation-f1":
        source = calibration.get("anomalous_source")
        return (f"the F1-max cut between the normal scores and {len(defects)} synthetic-defect images"
                + (f", {source}" if source else "") + f": F1 {calibration.get('validation_f1')}" + flags)
    text = "the largest normal score or mean + 3 sd of the normal scores, whichever is higher"
    if defects:  # validation-f1 was tried and kept this one
        text += (f"; the F1-max cut against {len(defects)} synthetic-defect images would have flagged every "
                 "normal image" + flags)
    return text


def model_card_section(tuning: dict[str, Any]) -> list[str]:
    """Markdown lines for the model card's 'Label-free tuning' section."""
    lines = [tuning.get("summary", "")]
    starts_from = (tuning.get("search") or {}).get("starts_from")
    if starts_from:
        lines += ["", f"Further starts of the search: the sampler settings of {', '.join(starts_from)}."]
    chosen, previous = tuning.get("chosen") or {}, tuning.get("previous") or {}
    if chosen and previous:
        lines += ["", "| setting | before | chosen |", "|---|---|---|"]
        for key in TABLE_KEYS:
            if key in TABLE_DEFAULTS:
                default = TABLE_DEFAULTS[key]
                if chosen.get(key, default) != default or previous.get(key, default) != default:
                    lines.append(f"| {key} | {previous.get(key, default)} | {chosen.get(key, default)} |")
            elif key in chosen:
                lines.append(f"| {key} | {previous.get(key)} | {chosen.get(key)} |")
        v = tuning.get("validation") or {}
        if v.get("aupro") is not None:
            lines.append(f"| validation AUPRO | {v.get('previous_aupro')} | {v.get('aupro')} |")
        if v.get("removal") is not None:
            lines.append(f"| validation defect removal | {v.get('previous_removal')} | {v.get('removal')} |")
    vs = tuning.get("validation_set") or {}
    if vs:
        lines += ["", f"Validation images made from: {vs.get('source')} ({', '.join(vs.get('images', [])[:12])}"
                  f"{', ...' if len(vs.get('images', [])) > 12 else ''}), rows {vs.get('rows')} at "
                  f"{vs.get('image_size')} px, seed {vs.get('seed')}."]
        if vs.get("in_sample"):
            used = "all of" if vs.get("source") == "training images" else "parts of"
            lines += ["", f"Training used {used} these images: the validation measures in-sample normals, so its "
                      "scores are optimistic."]
    if tuning.get("front_plot"):
        lines += ["", f"![speed/quality front of the tuning]({tuning['front_plot']})"]
    if tuning.get("calibrated_on"):
        lines += ["", f"Recalibrated with the chosen settings on "
                  f"{tuning.get('calibration_normals') or str(tuning['calibrated_on']) + ' normal images'}."]
    return lines
