"""Binary tasks (camouflaged objects) through `segpipe run`: probabilities and PySODMetrics' measures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    job_config,
    pysodmetrics_reference,
    read_run_table,
    segpipe_run,
    strict_json_load,
    tiny_checkpoint,
    write_png,
)
from PIL import Image

from pipeline.metrics.semantic import ClassAreas, class_areas, summarize
from pipeline.predict.tiling import Foreground, TilingSettings, labels_and_probability, segment_images
from pipeline.results.runstore import read_mask

KEYS = ("Sm", "Em_mean", "Em_max", "Em_adp", "wFm", "Fm_mean", "Fm_max", "Fm_adp", "MAE")


def blobs(root: Path, sizes: list[tuple[int, int]], positive: int = 1) -> Path:
    """Images with a brighter disc, labels with the disc as `positive` (and one all-background label)."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[:h, :w]
        disc = (yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 4) ** 2
        if i == len(sizes) - 1:
            disc[:] = False
        image = rng.integers(0, 120, (h, w, 3)).astype(np.uint8)
        image[disc] += 100
        write_png(root / "images" / f"b{i}.png", image)
        write_png(root / "labels" / f"b{i}.png", np.where(disc, positive, 1 - positive if positive in (0, 1) else 0).astype(np.uint8))
    return root


@pytest.mark.parametrize(
    "num_classes, foreground", [(2, 1), (1, 255)], ids=["two-class-head-0-1-class-labels", "one-logit-head-0-255-mask-labels"]
)
def test_binary_run_reports_pysodmetrics_measures_and_the_iou_of_class_index_and_0_255_mask_labels(
    ray_session, tmp_path, num_classes, foreground, capsys
):
    """Labels as class indices (0/1) or as 0/255 masks, the way COD, SOD and vessel data sets ship them,
    read alike (metrics.binary_labels auto): before, 255 was ignore_index and every foreground pixel
    counted nowhere (foreground IoU 0, Em max 1.000, wFm 0) without a word."""
    data = blobs(tmp_path / "data", [(40, 52), (33, 61), (48, 48)], positive=foreground)
    cfg = job_config(
        tmp_path,
        data / "images",
        tiny_checkpoint(tmp_path / "m.safetensors", num_classes, seed=3),
        labels=data / "labels",
        run_id="cod",
        metrics={"task": "binary"},
    )
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    run = tmp_path / "runs" / "cod"
    summary = strict_json_load(run / "summary.json")
    # the reference: PySODMetrics over the written 8-bit probability maps and the labels on 0-255
    # (a 0/255 mask file as it is), and mmseg's IoU of the written masks against the foreground
    images, areas = [], ClassAreas.zeros(2)
    for image_id in sorted(read_run_table(run, "masks").column("image_id").to_pylist()):
        label = np.asarray(Image.open(data / "labels" / image_id))
        truth = label > 128 if foreground == 255 else label == 1
        images.append((read_mask(str(run), image_id, "probability"), label if foreground == 255 else truth.astype(np.uint8) * 255))
        mask = read_mask(str(run), image_id)
        assert set(np.unique(mask)) <= {0, 1}
        areas += class_areas(mask, truth.astype(np.uint8), 2, None)
    expected, _ = pysodmetrics_reference(images)
    for key in KEYS:
        assert summary[key] == pytest.approx(expected[key], abs=1e-6, nan_ok=True), key
    assert summary["cod_images"] == 3 and len(summary["IoU"]) == 2
    np.testing.assert_allclose(summary["IoU"], summarize(areas)["IoU"])
    assert summary["IoU"][1] > 0  # the foreground is counted (before: 0, its pixels ignored)
    readings = {"mask" if foreground == 255 else "class_index": 2, "empty": 1}  # the last label is all background
    assert summary["label_readings"] == {"mask": 0, "class_index": 0, **readings}
    info = strict_json_load(run / "run.json")
    assert info["metrics"]["task"] == "binary" and set(KEYS) <= set(info["metrics"]["camouflaged_object"])
    assert info["metrics"]["binary_labels"]["setting"] == "auto" and info["metrics"]["binary_labels"]["images"] == summary["label_readings"]
    described = "0/255 masks (foreground > 128): 2" if foreground == 255 else "class indices: 2"
    assert capsys.readouterr().out.count(f"labels read as {described}, background only: 1") == 1
    metrics = read_run_table(run, "metrics")
    assert {"sm", "wfm", "mae", "em_curve", "fm_curve", "label_reading"} <= set(metrics.column_names)


def test_query_models_foreground_probability_is_their_share_not_a_softmax():
    from models.mask2former import Mask2Former
    from models.maskformer import MaskFormer

    assert MaskFormer.score_kind == Mask2Former.score_kind == "probabilities"
    scores = torch.tensor([[[0.2, 0.6]], [[0.6, 0.2]]])  # probability-like: background, foreground
    _, share = labels_and_probability(scores, Foreground(1, "probabilities"))
    _, softmax = labels_and_probability(scores, Foreground(1, "logits"))
    np.testing.assert_allclose(share, [[0.75, 0.25]], rtol=1e-6)
    assert not np.allclose(softmax, share)
    # and through the tiler, windows blended: still the share of the blended scores
    image = np.zeros((20, 30, 3), np.uint8)
    probs = lambda x: torch.stack([torch.full(x.shape[2:], 0.3), torch.full(x.shape[2:], 0.1)])[None].expand(x.shape[0], -1, -1, -1)
    settings = TilingSettings(mode="slide", window=(16, 16), stride=(8, 8), binary=True, score_kind="probabilities")
    [seg] = segment_images(probs, [image], settings)
    np.testing.assert_allclose(seg.probability, 0.25, rtol=1e-6)


def test_the_positive_class_picks_the_foreground():
    scores = torch.tensor([[[2.0]], [[0.0]]])
    _, p1 = labels_and_probability(scores, Foreground(1))
    _, p0 = labels_and_probability(scores, Foreground(0))
    np.testing.assert_allclose(p0 + p1, 1.0, rtol=1e-6)
    assert p1[0, 0] < 0.5 < p0[0, 0]
