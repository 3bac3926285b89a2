"""pipeline.coco_labels: COCO panoptic and instances files read for the object tasks' metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import job_config, segpipe_run, write_png

from pipeline.coco_labels import InstanceLabels, LabelsError, PanopticLabels, annotation_mask, image_key


def _random_polygons(rng: np.random.Generator, h: int, w: int) -> list[list[float]]:
    """One to three parts of 3-8 vertices: fractional, whole, half-pixel (centres and edges) or
    tenth-pixel coordinates, some outside the image, some with a repeated vertex."""
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        n, kind, top = int(rng.integers(3, 9)), int(rng.integers(0, 4)), max(h, w)
        if kind == 0:
            xy = rng.uniform(-5, top + 5, 2 * n)
        elif kind == 1:
            xy = rng.integers(-2, top + 2, 2 * n).astype(float)
        elif kind == 2:
            xy = np.round(rng.uniform(-1, top + 1, 2 * n) * 2) / 2
        else:
            xy = np.round(rng.uniform(-1, top + 1, 2 * n) * 10) / 10
            xy[2:4] = xy[0:2]
        parts.append([float(v) for v in xy])
    return parts


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools merge under numpy 2
def test_polygons_rasterise_bit_for_bit_as_pycocotools_and_rle_decodes_exactly():
    """Mask AP against polygon labels is COCOeval's only if the polygons are its masks: before, PIL's
    fill differed from pycocotools' on edge pixels."""
    from pycocotools import mask as coco_mask

    def reference(parts, h, w):
        return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(parts, h, w))).astype(bool)

    polygon = [[3.0, 4.0, 40.5, 6.0, 35.0, 30.0, 8.0, 27.5]]
    np.testing.assert_array_equal(annotation_mask(polygon, (36, 48)), reference(polygon, 36, 48))
    special = [
        [[1, 1, 8, 1, 8, 8, 1, 8], [2.0, 2.0, 6.0, 6.0]],  # a later part of 4 values
        [[1, 1, 8, 1, 8, 8, 1, 8, 3.3]],  # an odd number of values: the last one dropped
        [[0, 0, 12, 0, 12, 10, 0, 10]],  # edges on the image's border
        [[-0.5, -0.5, 11.5, -0.5, 11.5, 9.5, -0.5, 9.5]],  # edges through the outer pixels' centres
        [[0, 0, 10, 0, 10, 10, 0, 10, 0, 0, 3, 3, 3, 7, 7, 7, 7, 3, 3, 3]],  # a hole through a bridge: even-odd
        [[1, 1, 8, 1, 8, 8, 1, 8], [4, 4, 11, 4, 11, 9, 4, 9]],  # overlapping parts: their union
    ]
    for parts in special:
        np.testing.assert_array_equal(annotation_mask(parts, (10, 12)), reference(parts, 10, 12), err_msg=str(parts))
    assert annotation_mask(special[4], (10, 12)).sum() == 100 - 16
    rng = np.random.default_rng(0)
    for _ in range(400):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        parts = _random_polygons(rng, h, w)
        np.testing.assert_array_equal(annotation_mask(parts, (h, w)), reference(parts, h, w), err_msg=f"{h} x {w}: {parts}")
    mask = rng.random((23, 31)) > 0.6
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    np.testing.assert_array_equal(annotation_mask(rle, (23, 31)), mask)


def test_files_are_read_by_image_key_and_bad_ones_are_one_line(tmp_path):
    panoptic = {
        "annotations": [{"file_name": "000139.png", "segments_info": [{"id": 5, "category_id": 3, "iscrowd": 1}]}],
        "categories": [{"id": 3, "name": "person", "isthing": 1}, {"id": 7, "name": "sky", "isthing": 0}],
    }
    (tmp_path / "p.json").write_text(json.dumps(panoptic))
    labels = PanopticLabels.load(str(tmp_path / "p.json"), {})
    assert image_key("val/000139.jpg") == "000139" and labels.segments["000139"][0].iscrowd
    assert labels.categories.ids == [3, 7] and labels.categories.is_thing == [True, False]
    with pytest.raises(LabelsError, match="model has 3 classes but the file 2 categories"):
        labels.categories.check_classes(3, "metrics.panoptic_labels")
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"file_name": "a.png"}], "categories": [{"id": 1}]}))
    with pytest.raises(LabelsError, match="not a COCO instances file"):
        InstanceLabels.load(str(tmp_path / "bad.json"), {})


def test_a_label_file_that_does_not_fit_the_model_stops_the_run_with_exit_2(tmp_path, capsys):
    from helpers import tiny_hf_checkpoint

    tiny_hf_checkpoint("maskformer", tmp_path / "maskformer")  # 7 classes
    write_png(tmp_path / "images" / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "inst.json").write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "x"}]}))
    cfg = job_config(tmp_path, tmp_path / "images", tmp_path / "maskformer", inference={"task": "instance"})
    cfg["metrics"] = {"instance_labels": str(tmp_path / "inst.json")}
    capsys.readouterr()
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["segpipe: invalid config: metrics.instance_labels: the model has 7 classes but the file 1 categories"] or (
        len(err) == 1 and "the model has 7 classes but the file 1 categories" in err[0]
    )
    assert not (tmp_path / "runs").exists()
