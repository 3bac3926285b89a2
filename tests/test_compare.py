"""`segpipe compare`: real runs of tiny models on a small labeled folder, compared through the CLI."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import job_config, labeled_folder, read_run_table, segpipe_run, tiny_checkpoint
from PIL import Image

from jobs.cli import main
from models import load_model, save_native
from pipeline.analysis.compare import (
    batch_metrics,
    bootstrap_metric_samples,
    disagreement,
    interval,
    open_run,
    point_metrics,
    read_image_table,
    resample_counts,
)
from pipeline.results.masks import decode_png
from pipeline.results.run_tables import AREAS
from pipeline.results.runstore import read_confidence, read_mask

CLASSES = ["sky", "road", "tree"]
SIZES = [(40, 50)] * 4
SECTIONS = ("comparison-table", "per-class-iou", "pairs", "confusion", "speed-accuracy", "disagreements")


def constant_checkpoint(source: Path, path: Path, cls: int) -> Path:
    """`source` with its classifier made to predict class `cls` everywhere (weights 0, a large bias)."""
    model = load_model(str(source))
    with torch.no_grad():
        model.head.classifier.weight.zero_()
        model.head.classifier.bias.fill_(-10.0)
        model.head.classifier.bias[cls] = 10.0
    save_native(model, path)
    return path


def labeled_run(root: Path, name: str, images: Path, checkpoint: Path, labels: Path, **sections) -> Path:
    """A run `name` of `checkpoint` over labeled images, under root/runs: its directory."""
    cfg = job_config(root, images, checkpoint, labels=labels, run_id=name, **sections)
    assert segpipe_run(root / f"{name}.yaml", cfg) == 0
    return root / "runs" / name


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory) -> dict[str, Path]:
    """Four runs over one labeled folder of 4 images (3 classes): model a, model b (another seed), a
    model that predicts class 2 everywhere (b and it with a confidence map, output.confidence); and
    model a over a folder holding 2 of the 4 images."""
    root = tmp_path_factory.mktemp("compare")
    data = labeled_folder(root / "data", SIZES, len(CLASSES), seed=0)
    subset = labeled_folder(root / "subset", SIZES[:2], len(CLASSES), seed=0)  # the same first two images
    a = tiny_checkpoint(root / "a.safetensors", len(CLASSES), seed=2, class_names=CLASSES)
    b = tiny_checkpoint(root / "b.safetensors", len(CLASSES), seed=7, class_names=CLASSES)
    const = constant_checkpoint(a, root / "const.safetensors", 2)
    return {
        "a": labeled_run(root, "model-a", data / "images", a, data / "labels"),
        "b": labeled_run(root, "model-b", data / "images", b, data / "labels", output={"confidence": True}),
        "const": labeled_run(root, "constant", data / "images", const, data / "labels", output={"confidence": True}),
        "subset": labeled_run(root, "subset-a", subset / "images", a, subset / "labels"),
    }


@pytest.fixture(scope="module")
def compared(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compared") / "out"
    assert main(["compare", str(runs["a"]), str(runs["b"]), str(runs["const"]), "--out", str(out), "--receptive-field", "2"]) == 0
    return out


def test_the_report_holds_each_models_effective_receptive_field(compared):
    page = (compared / "report.html").read_text()
    section = page[page.index("id='receptive-field'") :]
    section = section[: section.index("</section>")]
    # a row and a figure per model; attention models have no finite theoretical field; the constant
    # model's output does not depend on its input: a note says so instead of a figure
    assert section.count("<tr><td class='text'>") == 2 and section.count("<img src='data:image/png;base64,") == 2
    assert "whole input" in section and "receptive field of constant: the gradient is zero everywhere" in page


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_comparison_holds_each_runs_summary_and_per_image_rows_join(runs, compared):
    rows = {r["run_id"]: r for r in pq.read_table(compared / "comparison.parquet").to_pylist()}
    assert list(rows) == ["model-a", "model-b", "constant"]
    for name, key in (("model-a", "a"), ("model-b", "b"), ("constant", "const")):
        s, row = summary(runs[key]), rows[name]
        for field in ("images", "errors", "labeled_images", "aAcc", "mIoU", "mAcc", "mDice"):
            assert row[field] == s[field], (name, field)
        assert row["IoU"] == s["IoU"] and row["class_names"] == s["class_names"] == CLASSES
        assert row["images_per_second"] == s["throughput"]["images_per_second"]
        assert row["wall_seconds"] == s["throughput"]["wall_seconds"] >= row["seconds"] > 0
        assert row["startup"] == s["throughput"]["startup"] and "Ray's start-up" in row["startup"]
        assert row["model"] == "segformer-b0" and row["parameters"] > 0 and row["checkpoint"].endswith(".safetensors")

    per_image = pq.read_table(compared / "per_image.parquet").to_pylist()
    ids = {name: sorted(r["image_id"] for r in per_image if r["run_id"] == name) for name in rows}
    assert ids["model-a"] == ids["model-b"] == ids["constant"] == [f"img{i:03d}.png" for i in range(4)]
    # each row's IoU is its own image's intersection / union (NaN where the union is 0)
    metrics = {r["image_id"]: r for r in read_run_table(runs["a"], "metrics").to_pylist()}
    for r in (r for r in per_image if r["run_id"] == "model-a"):
        m = metrics[r["image_id"]]
        expected = [i / u if u else math.nan for i, u in zip(m["intersection"], m["union"])]
        np.testing.assert_array_equal(r["IoU"], expected)

    # the report says whether a run's speed includes its start-up
    assert "the actors&#x27; start-up (loading the model) included, Ray&#x27;s start-up not" in (compared / "report.html").read_text()

    pairs = pq.read_table(compared / "pairs.parquet").to_pylist()
    assert len(pairs) == 3 * 2 * 3  # ordered pairs x (mIoU, mDice, aAcc)
    by = {(p["run_a"], p["run_b"], p["metric"]): p for p in pairs}
    for (a, b, metric), p in by.items():
        back = by[(b, a, metric)]
        assert p["difference"] == -back["difference"] and p["ci_low"] == -back["ci_high"] and p["resamples"] == 1000
        assert p["ci_low"] <= p["ci_high"]
    ab = by[("model-a", "model-b", "mIoU")]
    assert ab["value_a"] == summary(runs["a"])["mIoU"] and ab["value_b"] == summary(runs["b"])["mIoU"]


def test_disagreement_counts_each_runs_confident_pixels_where_the_runs_differ():
    """masks.disagreement on arrays: the pixels where any mask differs, and per run with a confidence
    map the share of the image's pixels that differ and where it is at least 0.9 sure (230 / 255 on
    the stored scale), and its mean confidence there; a run without a map gets None."""
    a = np.array([[0, 1, 2, 2], [1, 1, 0, 0]], np.uint8)
    b = np.array([[0, 2, 2, 1], [1, 0, 0, 0]], np.uint8)  # differs at (0, 1), (0, 3), (1, 1)
    c = np.array([[255, 230, 10, 229], [0, 100, 50, 40]], np.uint8)
    differ, (none, sure) = disagreement([a, b], [None, c])
    np.testing.assert_array_equal(differ, a != b)
    assert none is None
    assert sure.confident == 1 / 8  # 230 counts, 229 (0.898) does not
    assert sure.mean == pytest.approx((230 + 229 + 100) / 255 / 3, abs=1e-15)
    _, (agreeing,) = disagreement([a], [c])
    assert agreeing.confident == 0.0 and math.isnan(agreeing.mean)


def test_runs_with_a_confidence_map_give_their_confident_disagreement_per_image_and_in_the_report(runs, compared):
    """per_image.parquet's confident_disagreement and disagreement_confidence of model-b and constant
    (output.confidence) are a numpy count over their committed masks and confidence maps; model-a,
    without a map, has nulls. Before: no such columns, and the strips did not say how sure a run was."""
    per_image = pq.read_table(compared / "per_image.parquet").to_pylist()
    some_confident = 0
    for image_id in [f"img{i:03d}.png" for i in range(4)]:
        masks = [read_mask(str(runs[k]), image_id) for k in ("a", "b", "const")]
        differ = (masks[0] != masks[1]) | (masks[0] != masks[2])
        assert differ.any()
        rows = {r["run_id"]: r for r in per_image if r["image_id"] == image_id}
        assert rows["model-a"]["confident_disagreement"] is None and rows["model-a"]["disagreement_confidence"] is None
        for key, name in (("b", "model-b"), ("const", "constant")):
            confidence = read_confidence(str(runs[key]), image_id)
            expected = np.count_nonzero(differ & (confidence >= 230)) / differ.size
            assert rows[name]["confident_disagreement"] == pytest.approx(expected, abs=1e-12)
            assert rows[name]["disagreement_confidence"] == pytest.approx(confidence[differ].mean() / 255, abs=1e-12)
            some_confident += expected > 0
        # the constant model is sure everywhere (logits 10 against -10): all its disagreement is confident
        assert rows["constant"]["confident_disagreement"] == pytest.approx(rows["constant"]["disagreement"], abs=1e-12)
    assert some_confident
    page = (compared / "report.html").read_text()
    section = page[page.index("id='disagreements'") :]
    section = section[: section.index("</section>")]
    assert "runs differ, model-b, constant all sure (at least 90%)" in section and "one of them hesitates" in section
    assert section.count("model-b · mIoU") == section.count("· confident disagreement") / 2 > 0


def test_runs_over_different_images_are_refused_unless_intersect(runs, tmp_path, capsys):
    out = tmp_path / "refused"
    capsys.readouterr()
    assert main(["compare", str(runs["a"]), str(runs["subset"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 of 4 images" in err and "--intersect" in err and "Traceback" not in err
    assert not out.exists()

    out = tmp_path / "common"
    assert main(["compare", str(runs["a"]), str(runs["subset"]), "--out", str(out), "--intersect"]) == 0
    assert "report:" in capsys.readouterr().out
    rows = {r["run_id"]: r for r in pq.read_table(out / "comparison.parquet").to_pylist()}
    assert rows["model-a"]["images"] == rows["subset-a"]["images"] == 2
    assert rows["model-a"]["scope"] == "common images"
    # the same model on the same two images: model-a's numbers over them are subset-a's own summary
    for field in ("aAcc", "mIoU", "mAcc", "mDice", "IoU"):
        assert rows["model-a"][field] == summary(runs["subset"])[field]
    per_image = pq.read_table(out / "per_image.parquet")
    assert sorted(set(per_image.column("image_id").to_pylist())) == ["img000.png", "img001.png"]
    pairs = pq.read_table(out / "pairs.parquet").to_pylist()
    assert {p["difference"] for p in pairs} == {0.0} and {(p["ci_low"], p["ci_high"]) for p in pairs} == {(0.0, 0.0)}
    report = (out / "report.html").read_text()
    assert "--intersect: 2 images every run segmented are compared" in report
    # two folders: the report says the images and labels come from different places, matched by image_id
    assert "the runs read their images from different places" in report and "the runs read their labels from different places" in report
    # runs without a confidence map: no confidence columns, no shading, the strips as before
    assert per_image.column_names == ["run_id", "image_id", "labeled", "IoU", "mIoU", "pixel_accuracy", "disagreement"]
    assert "sure" not in (out / "report.html").read_text()


def test_runs_reading_other_places_or_reading_labels_otherwise_are_said_to_differ(compared):
    """Runs whose images or labels come from different places (matched by image_id alone), or whose
    labels were read otherwise (ignore_index, reduce_zero_label, binary_labels), get a note each: their
    numbers differ by that too. Runs alike get none (the fixture's three runs share one folder)."""
    from pipeline.analysis.compare.runs import Run, label_reading_words, source_notes

    def run(label: str, images: str = "data/images", labels: str | None = "data/labels", **metrics) -> Run:
        config = {"input": {"uri": images, "labels": {"uri": labels} if labels else None}, "metrics": metrics}
        return Run(label, label, label, None, {"config": config}, {}, None, 3, [])

    assert source_notes([run("a"), run("b", images="data/images/"), run("c", labels=None, ignore_index=0)]) == [
        "the runs read their labels from different places (a: data/labels; b: data/labels; c: None): "
        "images are matched by their image_id alone"
    ]  # c has no labels: how it would read them does not matter
    [note] = source_notes([run("a"), run("ade", reduce_zero_label=True)])
    assert note.startswith(
        "the runs read their labels differently (a: semantic, ignore_index 255; ade: semantic, ignore_index 255, reduce_zero_label)"
    )
    assert source_notes([run("a"), run("b", ignore_index=255, reduce_zero_label=False)]) == []  # the same reading, spelt out
    assert label_reading_words({"metrics": {"task": "binary"}}) == "binary, ignore_index 255, binary_labels class_index"
    assert label_reading_words({"metrics": {"task": "binary", "binary_labels": "mask"}}) == "binary, ignore_index none, binary_labels mask"
    report = (compared / "report.html").read_text()
    assert "different places" not in report and "read their labels differently" not in report


def test_bootstrap_of_a_run_against_itself_is_exactly_zero(runs):
    table = read_image_table(open_run(str(runs["a"])))
    samples = bootstrap_metric_samples([table, table], resamples=500, seed=3)
    for metric in ("mIoU", "mDice", "aAcc"):
        assert samples[0][metric].shape == (500,)
        assert interval(samples[0][metric] - samples[1][metric]) == (0.0, 0.0)
    # every resample draws n images; with every image once, the batch is summarize() exactly
    counts = resample_counts(len(table.ids), 200, np.random.default_rng(0))
    assert counts.shape == (200, 4) and set(counts.sum(axis=1)) == {4}
    once = batch_metrics(*(table.areas[a].sum(axis=0, keepdims=True).astype(np.float64) for a in AREAS))
    point = point_metrics(table)
    assert all(once[m][0] == point[m] == summary(runs["a"])[m] for m in ("mIoU", "mDice", "aAcc"))
    # seeded: the same draws give the same interval
    again = bootstrap_metric_samples([table, table], resamples=500, seed=3)
    np.testing.assert_array_equal(again[0]["mIoU"], samples[0]["mIoU"])


def test_model_against_a_constant_class_differs_on_every_image_and_its_interval_excludes_zero(runs, compared):
    for row in read_run_table(runs["const"], "masks").to_pylist():
        assert set(np.unique(decode_png(row["mask"]))) == {2}
    per_image = pq.read_table(compared / "per_image.parquet").to_pylist()
    const_masks = {r["image_id"]: decode_png(r["mask"]) for r in read_run_table(runs["const"], "masks").to_pylist()}
    for row in read_run_table(runs["a"], "masks").to_pylist():
        assert (decode_png(row["mask"]) != const_masks[row["image_id"]]).any(), row["image_id"]
    assert all(r["disagreement"] > 0 for r in per_image)
    pairs = {(p["run_a"], p["run_b"], p["metric"]): p for p in pq.read_table(compared / "pairs.parquet").to_pylist()}
    p = pairs[("model-a", "constant", "mIoU")]
    assert p["difference"] > 0 and 0 < p["ci_low"] <= p["difference"] <= p["ci_high"]


def test_binary_runs_compare_their_camouflaged_object_measures(ray_session, tmp_path):
    data = labeled_folder(tmp_path / "data", [(40, 50)] * 2, 2, seed=1)
    made = {}
    for name, seed in (("bin-a", 2), ("bin-b", 3)):
        checkpoint = tiny_checkpoint(tmp_path / f"{name}.safetensors", 2, seed=seed)
        made[name] = labeled_run(tmp_path, name, data / "images", checkpoint, data / "labels", metrics={"task": "binary"})
    assert "Sm" in summary(made["bin-a"]), "the binary task wrote no camouflaged-object measures"
    out = tmp_path / "out"
    assert main(["compare", str(made["bin-a"]), str(made["bin-b"]), "--out", str(out), "--resamples", "200"]) == 0
    rows = {r["run_id"]: r for r in pq.read_table(out / "comparison.parquet").to_pylist()}
    for name, run in made.items():
        for key in ("Sm", "Em_mean", "Em_max", "wFm", "Fm_mean", "MAE", "mIoU"):
            assert rows[name][key] == summary(run)[key], (name, key)
    pairs = {(p["run_a"], p["run_b"], p["metric"]): p for p in pq.read_table(out / "pairs.parquet").to_pylist()}
    for metric in ("mIoU", "mDice", "aAcc", "Sm", "Em_mean", "wFm", "MAE"):
        p = pairs[("bin-a", "bin-b", metric)]
        assert p["resamples"] == 200 and p["ci_low"] <= p["ci_high"]
        assert p["value_a"] == pytest.approx(summary(made["bin-a"])[metric], abs=1e-12)
    per_image = pq.read_table(out / "per_image.parquet")
    assert {"sm", "wfm", "mae", "em_adp", "fm_adp"} <= set(per_image.column_names)
    # a binary run against itself: every interval is [0, 0]
    table = read_image_table(open_run(str(made["bin-a"])))
    cod_rows = ~np.isnan(table.cod[:, 0])
    samples = bootstrap_metric_samples([table, table], resamples=100, cod_rows=cod_rows)
    for metric in ("Sm", "Em_mean", "wFm", "MAE"):
        assert interval(samples[0][metric] - samples[1][metric]) == (0.0, 0.0)
        # the resamples are means over images: their mean is near the dataset's value
        assert abs(samples[0][metric].mean() - summary(made["bin-a"])[metric]) < 0.05


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(compared, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): the report is not rendered")
    report = compared / "report.html"
    page = report.read_text()
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage"]
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri()],
        check=True, capture_output=True, timeout=90, cwd=tmp_path,
    )  # fmt: skip
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", report.as_uri()], check=True, capture_output=True, text=True, timeout=90, cwd=tmp_path
    ).stdout

    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels.astype(np.float64).var() > 500  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 50  # charts and overlays, not text alone

    for section in SECTIONS:
        assert f'id="{section}"' in dom, section
    table = dom.split('id="comparison-table"', 1)[1].split("</section>", 1)[0]
    assert table.count("<tr>") == 1 + 3 and all(name in table for name in ("model-a", "model-b", "constant"))
    for section in ("per-class-iou", "pairs", "confusion", "speed-accuracy"):
        body = dom.split(f'id="{section}"', 1)[1].split("</section>", 1)[0]
        assert 'class="chart"' in body and 'src="data:image/png;base64,' in body, section
    cases = dom.split('id="disagreements"', 1)[1].split("</section>", 1)[0]
    assert cases.count('class="case"') == 4  # every image: fewer than 6 in all
    # per image: the label and each run's mask as coloured overlays, and where they differ
    assert cases.count('class="overlay mask"') == 4 * 3 and cases.count('class="overlay label"') == 4
    assert cases.count('src="data:image/png;base64,') == 4 * (1 + 1 + 3 + 1)


def test_compare_without_matplotlib_exits_2_with_one_line_naming_the_report_extra_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as where the `report` extra is not installed: import fails
    capsys.readouterr()
    assert main(["compare", str(runs["a"]), str(runs["b"]), "--out", str(tmp_path / "cmp")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "segpipe: segpipe compare's report needs matplotlib: pip install 'segpipe[report]'"
    ]
    assert not (tmp_path / "cmp").exists()


# --------------------------------------------------------------------------- runs written without Ray


def test_a_binary_image_whose_s_measure_is_nan_still_counts_in_every_other_measure_of_the_pairs(tmp_path):
    """A mask label whose foreground is only its last column: its S-measure is NaN (PySODMetrics' own
    value), its MAE, wFm and Em are numbers. The pairs' binary measures of each run are its summary's,
    over all 4 images, and their intervals over resamples without that image. Before: the image was
    dropped from every binary measure in pairs.parquet (3 images, other values than the summary's)."""
    from helpers import labeled_photos, written_run

    from pipeline.analysis.compare import compare_runs

    rng = np.random.default_rng(1)
    labels, runs = {}, {}
    for k in range(4):
        label = np.zeros((20, 24), np.uint8)
        label[5:15, 6:16] = 255
        if k == 0:
            label[:] = 0
            label[:, -1] = 255
        labels[f"img{k}.png"] = label
    data = labeled_photos(tmp_path / "data", labels)
    metrics = {"task": "binary", "binary_labels": "mask"}
    for name, noise in (("A", 0.1), ("B", 0.3)):
        parts = [{i: ((lab > 128).astype(np.uint8) ^ (rng.random(lab.shape) < noise), lab) for i, lab in labels.items()}]
        runs[name] = written_run(tmp_path / "runs", name, parts, 2, ["bg", "fg"], data_root=data, metrics=metrics)
    assert math.isnan(runs["A"][1]["Sm"]) and runs["A"][1]["cod_images"] == 4
    compare_runs([runs["A"][0], runs["B"][0]], str(tmp_path / "out"), resamples=200)
    pairs = {p["metric"]: p for p in pq.read_table(tmp_path / "out" / "pairs.parquet").to_pylist() if p["run_a"] == "A"}
    for metric in ("MAE", "wFm", "Em_mean"):
        assert pairs[metric]["images"] == 4
        assert pairs[metric]["value_a"] == pytest.approx(runs["A"][1][metric]) and pairs[metric]["value_b"] == pytest.approx(
            runs["B"][1][metric]
        )
        assert not math.isnan(pairs[metric]["ci_low"])
    assert pairs["Sm"]["value_a"] is None or math.isnan(pairs["Sm"]["value_a"])  # as the run's own: NaN


def test_intersect_recomputes_each_run_over_the_compared_images_it_labeled(tmp_path):
    """--intersect: run A labeled all 3 images that both runs segmented; B had no label for one of
    them. A's row is A's own numbers on those 3 images (numpy over its masks and labels). Before:
    over the 2 images every run labeled, labeled_images 2, without a word."""
    from helpers import written_run

    from pipeline.analysis.compare import compare_runs
    from pipeline.metrics.semantic import class_areas, summarize
    from pipeline.rows import ClassAreas

    rng = np.random.default_rng(2)
    ids = [f"img{i}.png" for i in range(4)]
    labels = {i: rng.integers(0, 3, (16, 16)).astype(np.uint8) for i in ids}
    masks = {i: np.where(rng.random((16, 16)) < 0.5, labels[i], rng.integers(0, 3, (16, 16))).astype(np.uint8) for i in ids}
    masks["img1.png"] = labels["img1.png"].copy()
    a, _ = written_run(tmp_path / "runs", "A", [{i: (masks[i], labels[i]) for i in ids}], 3, list("xyz"))
    b, _ = written_run(tmp_path / "runs", "B", [{i: (masks[i], labels[i] if i != "img1.png" else None) for i in ids[:3]}], 3, list("xyz"))
    compare_runs([a, b], str(tmp_path / "out"), intersect=True, resamples=50)
    row = {r["run_id"]: r for r in pq.read_table(tmp_path / "out" / "comparison.parquet").to_pylist()}["A"]
    total = ClassAreas.zeros(3)
    for i in ids[:3]:
        total += class_areas(masks[i], labels[i], 3, 255)
    own = summarize(total)
    assert (row["scope"], row["images"], row["labeled_images"]) == ("common images", 3, 3)
    assert row["mIoU"] == pytest.approx(own["mIoU"]) and row["aAcc"] == pytest.approx(own["aAcc"])


def test_each_runs_confusion_matrix_reads_the_labels_as_that_run_read_them(tmp_path):
    """Run A reads labels with ignore_index 0, run B with the default: B's confusion matrix counts
    class 0 as B's metrics do (rows sum to its label areas, the diagonal to its intersections), A's
    leaves row 0 empty. Before: every run's matrix used the first run's reading (and label folder)."""
    from helpers import labeled_photos, written_run

    from pipeline.analysis.compare import compare_runs, open_run, read_image_table

    rng = np.random.default_rng(5)
    ids = [f"img{i}.png" for i in range(3)]
    labels = {i: rng.integers(0, 3, (20, 20)).astype(np.uint8) for i in ids}
    masks = {i: rng.integers(0, 3, (20, 20)).astype(np.uint8) for i in ids}
    data = labeled_photos(tmp_path / "data", labels)
    part = [{i: (masks[i], labels[i]) for i in ids}]
    a, _ = written_run(tmp_path / "runs", "A", part, 3, list("xyz"), data_root=data, metrics={"ignore_index": 0})
    b, _ = written_run(tmp_path / "runs", "B", part, 3, list("xyz"), data_root=data)
    result = compare_runs([a, b], str(tmp_path / "out"), resamples=20)
    for k, run in enumerate((a, b)):
        own = read_image_table(open_run(run))
        confusion = result.mask_pass.confusion[k]
        assert confusion.sum(1).tolist() == own.areas["label_area"].sum(0).tolist()
        assert np.diag(confusion).tolist() == own.areas["intersection"].sum(0).tolist()
    assert result.mask_pass.confusion[0][0].sum() == 0 and result.mask_pass.confusion[1][0].sum() > 0


def test_curve_means_of_rows_with_null_curves_anywhere_including_last():
    """A binary run's metrics part whose last row is a streamed image's (its curves null): each row's
    mean, NaN for the null ones. Before: np.add.reduceat's IndexError, and compare stopped."""
    import pyarrow as pa

    from pipeline.analysis.compare.runs import _curve_means

    column = pa.array([[1.0, 3.0], None, [2.0], None], pa.list_(pa.float64()))
    np.testing.assert_array_equal(_curve_means(column), [2.0, np.nan, 2.0, np.nan])
    assert np.isnan(_curve_means(pa.array([None, None], pa.list_(pa.float64())))).all()
