"""Each compared run's model's effective receptive field on a sample of the compared images, for the
report (`segpipe compare --receptive-field`); the field itself is pipeline.analysis.receptive_field's."""

from __future__ import annotations

import base64

from pipeline.analysis.compare.runs import Run
from pipeline.analysis.compare.sources import Sources, read_photo


def receptive_fields(runs: list[Run], image_ids: list[str], src: Sources, storage_options: dict, notes: list[str]) -> list[dict]:
    """Each run's model's effective receptive field (pipeline.analysis.receptive_field) on a sample of the
    compared images: the same images for every model, at the size of the run's sliding window (at
    most 256 pixels, so that the field fits the crop and the gradient stays cheap)."""
    from pipeline.analysis.receptive_field import effective_receptive_field, erf_figure_png
    from pipeline.config import ModelConfig
    from pipeline.predict.job_model import load_job_model

    photos = [p for p in (read_photo(src, i, storage_options) for i in image_ids) if p is not None]
    if not photos:
        notes.append("receptive fields need the run's images (an image folder): none was readable")
        return []
    out = []
    for run in runs:
        model_cfg = dict(run.config.get("model") or {})
        model_cfg["storage_options"] = storage_options  # run.json holds them redacted
        try:
            model = load_job_model(ModelConfig.model_validate(model_cfg))
        except Exception as exc:  # a checkpoint moved or gone: the report says so, the rest stands
            notes.append(f"receptive field of {run.label}: its model cannot be loaded ({' '.join(str(exc).split())[:200]})")
            continue
        window = (run.config.get("inference") or {}).get("window") or [256, 256]
        size = int(min(256, *window))
        try:
            result = effective_receptive_field(model, photos, size=size)
        except ValueError as exc:  # e.g. a model whose centre score ignores its input: nothing to draw
            notes.append(f"receptive field of {run.label}: {exc}")
            continue
        figure = erf_figure_png(result, f"{run.label} ({run.model_name})")
        out.append({"label": run.label, "result": result, "figure": "data:image/png;base64," + base64.b64encode(figure).decode()})
    return out
