"""pipeline.metrics.coco_labels: COCO panoptic and instances files read for the object tasks' metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import job_config, segpipe_run, write_png

from pipeline.metrics.coco_labels import InstanceLabels, LabelsError, PanopticLabels, YtvisLabels, image_key


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


def _ytvis(videos, annotations, categories=({"id": 1, "name": "cat"}, {"id": 2, "name": "dog"})) -> dict:
    return {"videos": list(videos), "annotations": list(annotations), "categories": list(categories)}


def test_youtube_vis_labels_match_videos_by_folder_and_key_frames_by_position_in_rle_polygons_and_null(tmp_path):
    from pipeline.io.coco_codec import encode_rle, polygon_mask

    square = np.zeros((6, 8), bool)
    square[1:4, 2:6] = True
    compressed = encode_rle(square)
    uncompressed = {"size": [6, 8], "counts": [13, 3, 3, 3, 3, 3, 3, 3, 14]}  # column-major runs, as YouTube-VIS 2019 ships
    polygon = [[1.0, 1.0, 6.5, 1.0, 6.5, 4.5, 1.0, 4.5]]
    data = _ytvis(
        [{"id": 4, "height": 6, "width": 8, "length": 3, "file_names": ["cams/a/00000.jpg", "cams/a/00005.jpg", "cams/a/00010.jpg"]}],
        [
            {"id": 1, "video_id": 4, "category_id": 2, "iscrowd": 0, "segmentations": [compressed, None, uncompressed]},
            {"id": 2, "video_id": 4, "category_id": 1, "iscrowd": 1, "segmentations": [None, polygon, None]},
        ],
    )
    (tmp_path / "vis.json").write_text(json.dumps(data))
    labels = YtvisLabels.load(str(tmp_path / "vis.json"), {})
    assert list(labels.videos) == ["cams/a"] and labels.videos["cams/a"].frames == 3 and labels.categories.ids == [1, 2]
    assert labels.truths("cams/b") is None  # the video cams/b.mp4 is not annotated
    first, second = labels.truths("cams/a")
    # frames keyed by position in the sampled frames (the file names' own numbers 0, 5, 10 are not read); null: absent
    assert (first.category_id, first.iscrowd, sorted(first.masks)) == (2, False, [0, 2])
    assert np.array_equal(first.masks[0], square) and np.array_equal(first.masks[2], square)
    assert (second.category_id, second.iscrowd, sorted(second.masks)) == (1, True, [1])
    assert np.array_equal(second.masks[1], polygon_mask(polygon[0], 6, 8)) and second.masks[1].any()
    labels.check_classes(3)  # category ids 1 and 2 are classes of a 3-class model
    with pytest.raises(LabelsError, match=r"none of the file's category ids \[1, 2\] is a class of the model \(0..0\)"):
        labels.check_classes(1)


@pytest.mark.parametrize(
    "videos, why",
    [
        ([{"id": 1, "height": 2, "width": 2, "file_names": ["a/0.jpg", "b/1.jpg"]}], "must share one folder"),
        ([{"id": 1, "height": 2, "width": 2, "file_names": ["0.jpg"]}], "must share one folder"),
        (
            [{"id": 1, "height": 2, "width": 2, "file_names": ["a/0.jpg"]}, {"id": 2, "height": 2, "width": 2, "file_names": ["a/1.jpg"]}],
            "two videos have the folder a",
        ),
        ([{"id": 1, "file_names": ["a/0.jpg"]}], "KeyError"),
    ],
)
def test_a_youtube_vis_file_that_cannot_be_matched_to_videos_is_one_line(tmp_path, videos, why):
    (tmp_path / "vis.json").write_text(json.dumps(_ytvis(videos, [])))
    with pytest.raises(LabelsError) as err:
        YtvisLabels.load(str(tmp_path / "vis.json"), {})
    assert "input.labels.uri" in str(err.value) and "not a YouTube-VIS annotations file" in str(err.value) and why in str(err.value)
    assert "\n" not in str(err.value)
