"""pipeline.metrics.coco_labels: COCO panoptic and instances files read for the object tasks' metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import job_config, segpipe_run, write_png

from pipeline.metrics.coco_labels import InstanceLabels, LabelsError, PanopticLabels, image_key


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
