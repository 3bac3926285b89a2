"""pipeline.results.summary_table: the summary printed at the end of a run shows each task's own metrics."""

from __future__ import annotations

from pipeline.results.summary_table import format_summary

# summary.json of an instance run with metrics.instance_labels and of a panoptic run with
# metrics.panoptic_labels (pipeline.plan.finish_job): no class-map labels, so labeled_images is 0
INSTANCE = {
    "images": 6, "errors": 0, "labeled_images": 0, "class_names": ["a", "b"],
    "objects": {"task": "instance", "table": "instances", "rows": 17},
    "mask_ap": {"AP": 0.4123, "AP50": 0.7, "AP75": 0.41, "APs": None, "APm": 0.3, "APl": 0.5, "images": 6},
}  # fmt: skip
PANOPTIC = {
    "images": 4, "errors": 1, "labeled_images": 0, "class_names": ["a", "b"],
    "objects": {"task": "panoptic", "table": "segments", "rows": 9},
    "panoptic": {"PQ": 0.5, "SQ": 0.8, "RQ": 0.625, "PQ_th": 0.55, "SQ_th": 0.8, "RQ_th": 0.7, "PQ_st": None, "panoptic_images": 4},
}  # fmt: skip


def test_an_instance_run_prints_its_mask_ap_and_counts_the_images_it_scored_as_labeled():
    lines = format_summary(INSTANCE, "runs/inst").splitlines()
    assert "mask AP 41.23   AP50 70.00   AP75 41.00   APs nan   APm 30.00   APl 50.00   (6 images)" in lines
    assert "images 6   errors 0   labeled 6   instances 17" in lines
    assert not any(line.startswith(("class", "aAcc", "PQ")) for line in lines)


def test_a_panoptic_run_prints_pq_sq_rq_with_things_and_stuff_and_counts_the_images_it_scored():
    lines = format_summary(PANOPTIC).splitlines()
    assert "PQ 50.00   SQ 80.00   RQ 62.50   (things PQ 55.00, stuff PQ nan; 4 images)" in lines
    assert "images 4   errors 1   labeled 4   segments 9" in lines
    assert not any(line.startswith("mask AP") for line in lines)


def test_a_semantic_run_prints_its_class_table_and_miou_as_before():
    summary = {
        "images": 2, "errors": 0, "labeled_images": 2, "class_names": ["sky", "road"], "IoU": [0.5, None], "Acc": [0.6, None],
        "Dice": [0.66, None], "mIoU": 0.5, "mAcc": 0.6, "mDice": 0.66, "aAcc": 0.7,
    }  # fmt: skip
    lines = format_summary(summary).splitlines()
    assert (
        lines[0] == "class    IoU    Acc   Dice" and lines[1] == "sky    50.00  60.00  66.00" and lines[2] == "road     nan    nan    nan"
    )
    assert "aAcc 70.00   mIoU 50.00   mAcc 60.00   mDice 66.00" in lines and lines[-1] == "images 2   errors 0   labeled 2"


def test_a_clip_run_prints_its_track_ap_and_the_labels_note_in_one_line_each():
    summary = {
        "images": 10, "errors": 0, "labeled_images": 0, "class_names": ["a", "b"],
        "objects": {"task": "instance", "table": "instances", "rows": 12},
        "video": {"videos": 2, "frames": 10, "clips": 4, "tracks": 3, "mask_ap": {
            "AP": 0.4123, "AP50": 0.7, "AP75": None, "AR1": 0.3, "AR10": 0.5, "videos": 1, "note": "1 of the run's videos are not in the labels",
        }},
    }  # fmt: skip
    lines = format_summary(summary).splitlines()
    assert "track mask AP 41.23   AP50 70.00   AP75 nan   AR1 30.00   AR10 50.00   (1 videos)" in lines
    assert "labels: 1 of the run's videos are not in the labels" in lines
    assert not any(line.startswith("mask AP") for line in lines)
