"""pipeline.predict.predictor: the one loop every image takes (`finish_image`), TIFFs segmented window by
window (`segment_tiff`), the actor's settings through `segpipe run` (streamed images, test-time
augmentation), and a 36000 x 2000 TIFF through the job in bounded memory (12000 x 12000: benchmarks/huge_tiff.py)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tifffile
import torch
from helpers import CLASS_NAMES, job_config, read_run_table, scene_pixels, segpipe_run, tiled_tiff, tiny_checkpoint, write_png

from models import load_model
from pipeline.io.tiff import StreamError
from pipeline.metrics.semantic import class_areas
from pipeline.predict.predictor import AREA_ROWS, ModelScorer, finish_image, limit_heap_growth, segment_tiff
from pipeline.predict.tiling import TilingSettings, TTAScoreFn, segment_images, with_tta
from pipeline.results.masks import assemble_mask, decode_png, quantize_probability
from pipeline.results.runstore import read_mask
from pipeline.rows import StreamSource
from pipeline.telemetry import StageClock

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (301, 517, 3), dtype=np.uint8)
BINARY_LABEL = RNG.integers(0, 2, (301, 517)).astype(np.uint8)


def cpu_scorer(checkpoint: Path) -> ModelScorer:
    return ModelScorer(load_model(str(checkpoint)).eval(), torch.device("cpu"))


def crops_batch(crops: list[np.ndarray], labels: list[np.ndarray] | None = None) -> tuple[list, dict]:
    """The predictor's rows of images held in memory (ids 0.png, 1.png, ...; `labels` beside them), and
    the batch of them an actor's call takes."""
    from pipeline.rows import DecodedImage, to_columns

    images = [
        DecodedImage(unit=0, image_id=f"{i}.png", image=np.ascontiguousarray(c), label=label, height=c.shape[0], width=c.shape[1])
        for i, (c, label) in enumerate(zip(crops, labels or [None] * len(crops)))
    ]
    return images, to_columns([image.to_record() for image in images])


def test_model_scorer_counts_its_seconds_as_transfer_and_forward_and_returns_the_models_scores(checkpoint):
    model = load_model(str(checkpoint)).eval()
    clock = StageClock()
    windows = torch.from_numpy(RGB[:64, :64]).permute(2, 0, 1)[None].float().repeat(2, 1, 1, 1)
    scores = ModelScorer(model, torch.device("cpu"), clock=clock)(windows)
    with torch.inference_mode():
        assert torch.equal(scores, model(model.normalize(windows)))
    assert clock.seconds["forward"] > 0 and 0 <= clock.seconds["transfer"] < clock.seconds["forward"], clock.seconds
    assert clock.model_seconds() == clock.seconds["forward"] + clock.seconds["transfer"]


# --------------------------------------------------------------------------- finish_image


def test_finish_image_gives_the_same_chunks_and_areas_whatever_the_bands():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (150, 70)).astype(np.uint8)
    label = rng.integers(0, 3, (150, 70))
    label[:4] = 255  # ignored rows
    reads, progress = [], []

    def label_rows(y, n):
        reads.append((y, n))
        return label[y : y + n]

    bands = [(0, labels[:37], None), (37, labels[37:100], None), (100, labels[100:], None)]
    chunks, areas = finish_image(
        iter(bands),
        150,
        70,
        label_rows,
        num_classes=3,
        chunk_size=64,
        binary=False,
        ignore_index=255,
        on_rows=lambda done, total: progress.append((done, total)),
    )
    assert progress == [(37, 150), (100, 150), (150, 150)]  # after each band, the rows finished so far
    assert [(c.y, c.x, c.height, c.width) for c in chunks] == [
        (0, 0, 64, 64),
        (0, 64, 64, 6),
        (64, 0, 64, 64),
        (64, 64, 64, 6),
        (128, 0, 22, 64),
        (128, 64, 22, 6),
    ]
    mask = np.zeros_like(labels)
    for c in chunks:
        mask[c.y : c.y + c.height, c.x : c.x + c.width] = decode_png(c.mask)
        assert c.probability is None
    np.testing.assert_array_equal(mask, labels)
    # areas counted on every label row once, at most AREA_ROWS rows at a time
    assert sum(n for _, n in reads) == 150 and max(n for _, n in reads) <= AREA_ROWS
    whole = class_areas(labels, label, 3, 255)
    for name in ("intersection", "union", "pred_area", "label_area"):
        np.testing.assert_array_equal(getattr(areas, name), getattr(whole, name))
    # an unlabeled image has no areas
    assert finish_image(iter(bands), 150, 70, None, num_classes=3, chunk_size=None, binary=False, ignore_index=255)[1] is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_limit_heap_growth_sets_the_mmap_threshold_under_glibc():
    assert limit_heap_growth() is True


# --------------------------------------------------------------------------- segment_tiff


def test_segment_tiff_reports_rows_as_bands_finish_and_refuses_a_label_of_another_size(tmp_path):
    tifffile.imwrite(tmp_path / "scene.tif", RGB, tile=(64, 64), compression="zlib")
    tifffile.imwrite(tmp_path / "label.tif", BINARY_LABEL, rowsperstrip=32)
    seen = []
    chunks, areas = segment_tiff(
        lambda pixels: pixels[:, :2].float(),
        StreamSource(str(tmp_path / "scene.tif"), str(tmp_path / "label.tif"), 301, 517),
        TilingSettings(window=(64, 64), stride=(48, 48), batch_size=4),
        num_classes=2,
        chunk_size=128,
        on_rows=lambda done, total: seen.append((done, total)),
    )
    assert len(seen) > 2 and seen[-1] == (301, 301) and {total for _, total in seen} == {301}
    assert all(a < b for (a, _), (b, _) in pairwise(seen))
    assert areas is not None and len(chunks) == 3 * 5
    # a label replaced by one of another size since the probe is refused, not misread
    tifffile.imwrite(tmp_path / "label.tif", np.zeros((300, 517), np.uint8))
    with pytest.raises(StreamError, match=r"label .* is 517 x 300 but the image is 517 x 301"):
        segment_tiff(
            lambda pixels: pixels[:, :2].float(),
            StreamSource(str(tmp_path / "scene.tif"), str(tmp_path / "label.tif"), 301, 517),
            TilingSettings(window=(64, 64), stride=(48, 48)),
            num_classes=2,
            chunk_size=None,
        )


def test_streamed_images_need_slide_mode(tmp_path):
    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, RGB, tile=(64, 64))
    with pytest.raises(StreamError, match=r"inference.mode must be 'slide'"):
        segment_tiff(
            lambda x: x[:, :2], StreamSource(str(path), None, 301, 517), TilingSettings(mode="whole"), num_classes=2, chunk_size=None
        )


# --------------------------------------------------------------------------- through `segpipe run`


def test_streamed_tiff_through_segpipe_run_equals_the_in_memory_computation(ray_session, tmp_path):
    """A tiled TIFF over input.max_pixels is streamed (decoding it whole would be an error row),
    with TTA, a striped TIFF label and chunked mask rows; it equals the in-memory computation."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)
    label = rng.integers(0, 2, (333, 517)).astype(np.uint8)
    label[:5] = 255
    tifffile.imwrite(images / "scene.tif", image, tile=(64, 64), compression="zlib", photometric="rgb")
    tifffile.imwrite(labels / "scene.tif", label, rowsperstrip=10, compression="zlib")
    small = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    write_png(images / "small.png", small)
    tifffile.imwrite(images / "float.tif", np.zeros((400, 400), np.float32), tile=(64, 64))  # cannot be streamed
    checkpoint = tiny_checkpoint(tmp_path / "binary.safetensors", 2)
    inference = {
        "mode": "slide",
        "window": [64, 64],
        "stride": [48, 48],
        "blend": "gaussian",
        "batch_size": 4,
        "tta": {"flip": True, "scales": [1.0, 0.75]},
    }
    cfg = job_config(
        tmp_path,
        images,
        checkpoint,
        labels=labels,
        run_id="streamed",
        inference=inference,
        input={"stream_above_pixels": 100_000, "max_pixels": 150_000},
        output={"chunk_size": 128},
        max_error_fraction=0.5,
    )
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    run = tmp_path / "runs" / "streamed"
    ids = read_run_table(run, "masks").column("image_id").to_pylist()
    assert ids.count("scene.tif") == 3 * 5 and ids.count("small.png") == 1
    errors = read_run_table(run, "errors").to_pylist()
    assert [e["image_id"] for e in errors] == ["float.tif"] and "cannot be read window by window" in errors[0]["error"]
    assert json.loads((run / "summary.json").read_text())["images"] == 2  # images, not chunk rows

    score_fn = with_tta(cpu_scorer(checkpoint), flip=True, scales=[1.0, 0.75])
    settings = TilingSettings(window=(64, 64), stride=(48, 48), blend="gaussian", batch_size=4, binary=True)
    expected = segment_images(score_fn, [image, small], settings)
    streamed = read_mask(str(run), "scene.tif")
    assert streamed.shape == (333, 517)
    assert (streamed == expected[0].labels).mean() >= 0.999
    probability = read_mask(str(run), "scene.tif", "probability").astype(int)
    assert (np.abs(probability - quantize_probability(expected[0].probability)) <= 1).mean() >= 0.999
    assert (read_mask(str(run), "small.png") == expected[1].labels).mean() >= 0.999
    # class areas summed band by band equal those of the whole written mask against the whole label
    metrics = {r["image_id"]: r for r in read_run_table(run, "metrics").to_pylist()}
    areas = class_areas(streamed, label.astype(np.int64), 2, 255)
    for name in ("intersection", "union", "pred_area", "label_area"):
        assert metrics["scene.tif"][name] == getattr(areas, name).tolist()


def test_config_tta_reaches_every_image_through_segpipe_run(ray_session, tmp_path, checkpoint):
    images = tmp_path / "images"
    rng = np.random.default_rng(5)
    arrays = {f"img{i}.png": rng.integers(0, 256, size, dtype=np.uint8) for i, size in enumerate([(60, 90, 3), (41, 33, 3)])}
    for name, array in arrays.items():
        write_png(images / name, array)
    tta = {"flip": True, "scales": [1.0, 1.5]}
    cfg = job_config(
        tmp_path, images, checkpoint, run_id="tta", inference={"window": [48, 48], "stride": [32, 32], "batch_size": 4, "tta": tta}
    )
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 0
    run = tmp_path / "runs" / "tta"
    assert read_run_table(run, "masks").num_rows == 2

    scorer = cpu_scorer(checkpoint)
    settings = TilingSettings(window=(48, 48), stride=(32, 32), batch_size=4)
    with_aug = segment_images(TTAScoreFn(scorer, **tta), list(arrays.values()), settings)
    without = segment_images(scorer, list(arrays.values()), settings)
    assert len(np.unique(without[0].labels)) > 1  # a model whose labels could change
    changed = 0
    for (name, _), expected, plain in zip(arrays.items(), with_aug, without):
        written = read_mask(str(run), name)
        assert (written == expected.labels).mean() >= 0.999
        changed += int((written != plain.labels).sum())
    assert changed > 0  # the run used the augmented views: without them some labels differ


# --------------------------------------------------------------------------- a large TIFF in bounded memory

# The short image comes first in the same job: the actor's memory when it opens the tall one is
# that of a 1000-row image (two rows of windows, as many as the stitcher's band holds); whatever the
# remaining 17000 rows add shows as growth beyond it, measured as the bytes its heap holds in use
# (glibc's mallinfo2, sampled every 5 ms: numpy's arrays and torch's tensors, exact enough that a
# whole-image plane of one byte a pixel shows: growth 1-3 MB, a plane when the mask's rows were
# kept). Not the peak RSS (VmHWM): it counts the heap's free fragments too, whose high-water mark
# wanders by 5-206 MB from run to run whatever the image's height; the RSS as the image grows, up to
# 12000 x 12000, is benchmarks/huge_tiff.py's measurement.
HUGE, SHORT = (18000, 1000), (1000, 1000)  # (height, width): the same width, 18x the rows
CLASSES = 4
WINDOW = 500  # divides both sides: windows do not overlap, so a crop on the window grid is computed alone
IGNORED_ROWS = 7


def scene_label(y0: int, x0: int, height: int, width: int) -> np.ndarray:
    yy = np.arange(y0, y0 + height)[:, None]
    xx = np.arange(x0, x0 + width)[None, :]
    label = (((yy // 400) + (xx // 700)) % 2).astype(np.uint8)
    label[yy[:, 0] < IGNORED_ROWS] = 255
    return label


MEASURE = textwrap.dedent('''
    """Run one job in a local Ray, watching the peak RSS (VmHWM) of every process it starts, and the
    predictor actor's peak at the moment it opens the file named by argv[2]; the actor's heap in use
    (its peak, and its peak when it opened that file) comes from a worker hook through folder argv[3]."""
    import json, os, resource, sys, threading, time
    import ray

    def trace_allocations(marker=sys.argv[2], folder=sys.argv[3]):
        """A worker's setup hook: once the worker is the predictor actor, the peak of the bytes its
        heap holds in use (glibc's mallinfo2: numpy's arrays and torch's tensors, not the free
        fragments that RSS also counts), and that peak when it opened `marker`."""
        import ctypes, json, os, threading, time

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        mallinfo2.restype = MallInfo2

        def in_use():
            info = mallinfo2()
            return info.uordblks + info.hblkhd  # allocated from the heaps, and mmapped blocks

        def has_open(path):
            for fd in os.listdir("/proc/self/fd"):
                try:
                    if os.readlink(f"/proc/self/fd/{fd}") == path:
                        return True
                except OSError:  # closed since listed
                    pass
            return False

        def report():
            while True:
                with open("/proc/self/cmdline", "rb") as f:
                    if b"Predictor" in f.read():
                        break
                time.sleep(0.05)
            peak = at_marker = 0
            while True:
                for _ in range(10):
                    peak = max(peak, in_use())
                    time.sleep(0.005)
                if not at_marker and has_open(marker):
                    at_marker = peak
                with open(f"{folder}/{os.getpid()}.tmp", "w") as f:
                    json.dump({"peak": peak, "at_marker": at_marker}, f)
                os.replace(f"{folder}/{os.getpid()}.tmp", f"{folder}/{os.getpid()}.json")

        threading.Thread(target=report, daemon=True).start()

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, object_store_memory=256 * 2**20,
             runtime_env={"worker_process_setup_hook": trace_allocations})
    from pipeline.config import load_config
    from pipeline.plan import run_job

    config, marker, heap_reports = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]

    def status(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            return int(fields["PPid"]), int(fields.get("VmHWM", "0 kB").split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None

    def name(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().split(b"\\0")[0].decode(errors="replace")
        except OSError:
            return ""

    def descendants():
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (found := status(int(entry))):
                parents[int(entry)] = found[0]
        mine, todo = set(), [os.getpid()]
        while todo:
            parent = todo.pop()
            children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in mine]
            mine.update(children)
            todo.extend(children)
        return mine

    def has_open(pid, path):
        try:
            return any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return False

    peaks, names, at_marker, stop = {}, {}, {}, threading.Event()

    def watch():
        # VmHWM is the kernel's own peak of each process: polling only has to see every process
        # (a tree scan every 0.5 s) and notice the actor opening the marker file (every 0.1 s)
        tick = 0
        while not stop.is_set():
            if tick % 5 == 0:
                for pid in descendants() - names.keys():
                    names[pid] = name(pid)
            for pid in list(names):
                found = status(pid)
                if found:
                    peaks[pid] = max(peaks.get(pid, 0), found[1])
                    if "Predictor" not in names[pid]:
                        names[pid] = name(pid) or names[pid]  # workers are renamed as they start tasks and actors
                if "Predictor" in names[pid] and pid not in at_marker and has_open(pid, marker):
                    at_marker[pid] = peaks[pid]
            tick += 1
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.time()
    result = run_job(load_config(config), progress=lambda line: None)
    elapsed = time.time() - started
    stop.set()
    watcher.join()
    workers = {pid: peak for pid, peak in peaks.items() if names[pid].startswith("ray::")}
    actors = [pid for pid in workers if "Predictor" in names[pid]]
    time.sleep(0.2)  # the hooks' last reports
    heaps = {pid: json.load(open(f"{heap_reports}/{pid}.json")) for pid in actors if os.path.exists(f"{heap_reports}/{pid}.json")}
    print("RESULTS " + json.dumps({
        "status": result.status, "message": result.message, "seconds": round(elapsed, 1),
        "worker_peak": max(workers.values()), "actor_peak": max(workers[pid] for pid in actors) if actors else 0,
        "actor_peak_at_marker": max(at_marker.values()) if at_marker else 0,
        "actor_in_use_peak": max([t["peak"] for t in heaps.values()] or [0]),
        "actor_in_use_at_marker": max([t["at_marker"] for t in heaps.values()] or [0]),
        "other_workers_peak": max([peak for pid, peak in workers.items() if pid not in actors] or [0]),
        "driver_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))
''')


def test_huge_tiff_is_segmented_in_bounded_memory(tmp_path):
    """An 18000 x 1000 RGB TIFF (54 MB decoded, 288 MB of float32 scores for 4 classes) with its
    label, through `run_job` in a subprocess: the predictor actor's heap in use barely moves between
    a 1000-row image of the same width and the 17000 rows more of the tall one, and the chunked mask
    reassembles and matches a direct computation on a crop."""
    started = time.time()
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for shape, name in ((SHORT, "0-short.tif"), (HUGE, "1-huge.tif")):  # listed, and segmented, in this order
        tiled_tiff(images / name, shape, 256, scene_pixels, photometric="rgb")
        tiled_tiff(labels / name, shape, 512, scene_label, photometric="minisblack")
    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors", CLASSES)
    config = job_config(
        tmp_path,
        images,
        checkpoint,
        labels=labels,
        run_id="huge",
        input={"stream_above_pixels": 500_000},  # both streamed: the short one has 1 M pixels
        # a row of windows a batch, in the short image as in the tall one; a narrow image in small
        # batches keeps the RSS's noise low: 36000 x 2000 in batches of 4 windows saw 12-206 MB of
        # growth, these pixels in batches of 2 (outside Ray) 5-22 MB
        inference={"window": [WINDOW, WINDOW], "stride": [WINDOW, WINDOW], "batch_size": 2},
        output={"chunk_size": 1024},
    )
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    written = time.time()
    heap_reports = tmp_path / "heap"
    heap_reports.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(config), str(images / "1-huge.tif"), str(heap_reports)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    measured_at = time.time()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    measured = json.loads(lines[-1][len("RESULTS ") :])
    print("\nmeasured:", {k: f"{v / 2**20:.0f} MB" if k.endswith(("peak", "marker")) else v for k, v in measured.items()})
    assert measured["status"] == "succeeded", measured["message"]

    plane = HUGE[0] * HUGE[1]  # 18 MB: the whole image at one byte a pixel (its mask, its label)
    assert measured["actor_peak_at_marker"] > 0, "the watcher never saw the actor open the huge image"
    assert measured["actor_in_use_at_marker"] > 0, "the actor's heap was never sampled with the huge image open"
    # the heap in use for 17000 more rows: a few MB; any whole-image array (its pixels decoded, its
    # mask or label held before chunking, its scores: 16 planes) is a plane or more
    in_use_growth = measured["actor_in_use_peak"] - measured["actor_in_use_at_marker"]
    assert in_use_growth < plane / 2, f"the actor's heap in use grew by {in_use_growth / 2**20:.0f} MB with the image's height"
    assert measured["other_workers_peak"] < measured["actor_peak"]  # the read tasks only read headers

    run = tmp_path / "runs" / "huge"
    table = read_run_table(run, "masks")
    huge_rows = table.filter(pa.compute.equal(table.column("image_id"), "1-huge.tif"))
    assert huge_rows.num_rows == 18  # 18 x 1 chunks of at most 1024 x 1024
    assert max(len(cell) for cell in huge_rows.column("mask").to_pylist()) < 2**20
    mask = assemble_mask(huge_rows, "mask")
    assert mask.shape == HUGE

    # a crop on the window grid, computed directly with the same model and windows
    y0, x0, size = 4500, 0, 1000
    settings = TilingSettings(window=(WINDOW, WINDOW), stride=(WINDOW, WINDOW), batch_size=8)
    direct = segment_images(cpu_scorer(checkpoint), [scene_pixels(y0, x0, size, size)], settings)[0]
    assert (mask[y0 : y0 + size, x0 : x0 + size] == direct.labels).mean() >= 0.999

    # class areas summed band by band in the actor: predicted areas are the written mask's, labeled
    # ones the label's (all but the ignored rows); exact intersections are checked on the small
    # streamed image above
    metrics = {m["image_id"]: m for m in read_run_table(run, "metrics").to_pylist()}
    assert sorted(metrics) == ["0-short.tif", "1-huge.tif"]
    areas = metrics["1-huge.tif"]
    assert areas["pred_area"] == np.bincount(mask[IGNORED_ROWS:].ravel(), minlength=CLASSES).tolist()
    assert sum(areas["label_area"]) == (HUGE[0] - IGNORED_ROWS) * HUGE[1]
    assert all(i <= min(p, q) for i, p, q in zip(areas["intersection"], areas["pred_area"], areas["label_area"]))
    print(f"seconds: write {written - started:.1f}, job {measured_at - written:.1f}, checks {time.time() - measured_at:.1f}")


@pytest.mark.parametrize("model_type", ["mask2former", "detr"])
def test_every_query_family_gives_instances_and_panoptic_segments_through_the_actor(tmp_path, model_type):
    """Mask2Former and DETR checkpoints (MaskFormer runs through `segpipe run` in test_plan.py) in
    the predictor actor: the instance task's rows decode to their areas, the panoptic task's segment
    map holds exactly its segments."""
    from helpers import tiny_hf_checkpoint

    from pipeline.config import load_config
    from pipeline.io.coco_codec import decode_rle
    from pipeline.predict.predictor import Predictor
    from pipeline.rows import DecodedImage, Prediction, to_columns

    tiny_hf_checkpoint(model_type, tmp_path / "model", seed=1)  # seed 1: its queries name classes, not "no object"
    image = DecodedImage(unit=0, image_id="a.png", image=np.ascontiguousarray(RGB[:64, :80]), height=64, width=80)
    loose = {"threshold": 0.0, "mask_threshold": 0.01, "overlap_threshold": 0.0, "top_k": 3}
    for task in ("instance", "panoptic"):
        inference = {"task": task, "objects": loose, "window": [48, 48], "stride": [32, 32]}
        cfg = load_config(job_config(tmp_path, tmp_path, tmp_path / "model", inference=inference))
        row = Prediction.from_batch(Predictor(cfg)(to_columns([image.to_record()])), 0)
        assert not row.error and row.objects, (task, row.error)
        mask = decode_png(row.chunks[0].mask)
        if task == "instance":
            for obj in row.objects:
                assert decode_rle({"size": [64, 80], "counts": obj["rle"]}).sum() == obj["area"] > 0
            assert mask.shape == (64, 80)  # the label map of the same passes
        else:
            assert sorted(o["segment_id"] for o in row.objects) == np.unique(mask[mask > 0]).tolist()
            assert all(int((mask == o["segment_id"]).sum()) == o["area"] for o in row.objects)


def test_an_actor_out_of_memory_above_2_windows_segments_every_image_and_reports_the_size(ray_session, tmp_path, checkpoint, monkeypatch):
    """The predictor (as a plain class) with a stand-in scorer that runs out of memory above 2
    windows a batch: every image segmented, the masks those of a scorer with room, the size 2
    remembered and sent to the run monitor (run.json's actors.lowered_batch_sizes). Before: the
    OutOfMemoryError reached the actor's image-by-image retry at the same batch size, and every
    image was an errors row. In whole mode (one image a forward) only the image that does not fit
    alone is one. The stitcher on the device (forced on the CPU) running out of memory once: the same
    masks, and the bytes that stitch needed in run.json's lowered_batch_sizes."""
    import ray

    import pipeline.predict.tiling as tiling
    from pipeline.config import load_config
    from pipeline.plan import _run_monitor_class
    from pipeline.predict.predictor import Predictor
    from pipeline.rows import Prediction, to_columns

    def predictor_out_of_memory(cfg, monitor=None, most_windows: int = 2, most_pixels: int = 2**30) -> tuple[Predictor, list[int]]:
        predictor, calls = Predictor(cfg, monitor=monitor), []
        score_fn = predictor.score_fn

        def scored(windows: torch.Tensor) -> torch.Tensor:
            calls.append(len(windows))
            if len(windows) > most_windows or windows[0, 0].numel() > most_pixels:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return score_fn(windows)

        predictor.score_fn = scored
        return predictor, calls

    crops = [RGB[:70, :90], RGB[100:160, 200:300], RGB[200:240, :50]]
    images, batch = crops_batch(crops)
    cfg = load_config(job_config(tmp_path, tmp_path, checkpoint, inference={"window": [48, 48], "stride": [32, 32], "batch_size": 8}))
    with_room = [Prediction.from_batch(Predictor(cfg)(batch), i) for i in range(3)]
    monitor = _run_monitor_class().remote()
    predictor, calls = predictor_out_of_memory(cfg, monitor)
    out = [Prediction.from_batch(predictor(batch), i) for i in range(3)]
    for row, expected in zip(out, with_room):
        assert not row.error and np.array_equal(decode_png(row.chunks[0].mask), decode_png(expected.chunks[0].mask))
    assert predictor.batch_sizes.lowered == {(48, 48): 2} and calls[:3] == [8, 4, 2] and max(calls[2:]) == 2
    predictor(to_columns([images[0].to_record()]))  # the next batch keeps the size: nothing above 2 again
    assert max(calls[2:]) == 2
    assert ray.get(monitor.lowered_batch_sizes.remote(), timeout=30) == {"48x48": 2}
    stitching, _ = predictor_out_of_memory(cfg, monitor, most_windows=8)
    stitching.stitch_device, resize, resized = torch.device("cpu"), tiling._resize_on_device, []

    def resize_out_of_memory_once(scores, size):
        resized.append(size)
        if len(resized) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return resize(scores, size)

    monkeypatch.setattr(tiling, "_resize_on_device", resize_out_of_memory_once)
    out = [Prediction.from_batch(stitching(batch), i) for i in range(3)]
    for row, expected in zip(out, with_room):
        assert not row.error and np.array_equal(decode_png(row.chunks[0].mask), decode_png(expected.chunks[0].mask))
    bands = stitching.batch_sizes.stitch_on_cpu_from
    assert len(resized) > 3 and bands == (len(CLASS_NAMES) + 1) * 48 * 90 * 4  # the first image's band (padded width 90)
    assert ray.get(monitor.lowered_batch_sizes.remote(), timeout=30) == {"48x48": 2, "stitcher_on_cpu_from_bytes": bands}
    ray.kill(monitor)
    whole, _ = predictor_out_of_memory(
        load_config(job_config(tmp_path, tmp_path, checkpoint, inference={"mode": "whole"})), most_pixels=64 * 64
    )
    rows = [Prediction.from_batch(whole(batch), i) for i in range(3)]
    assert [bool(r.error) for r in rows] == [True, True, False] and "OutOfMemoryError" in rows[0].error


def test_the_onnxruntime_backend_gives_the_torch_backends_masks_through_the_actor(tmp_path, checkpoint, caplog):
    from pipeline.config import load_config
    from pipeline.predict.predictor import Predictor
    from pipeline.rows import DecodedImage, Prediction, to_columns

    images = [
        DecodedImage(unit=0, image_id=f"{i}.png", image=np.ascontiguousarray(RGB[i * 50 : i * 50 + 70, :90]), height=70, width=90)
        for i in range(3)
    ]
    batch = to_columns([image.to_record() for image in images])
    masks = {}
    for backend in ("torch", "onnxruntime"):
        cfg = load_config(job_config(tmp_path, tmp_path, checkpoint, inference={"backend": backend, "batch_size": 5}))
        with caplog.at_level("WARNING", logger="models.onnx_backend"):
            out = Predictor(cfg)(batch)
        masks[backend] = [decode_png(Prediction.from_batch(out, i).chunks[0].mask) for i in range(len(images))]
    assert all(np.array_equal(a, b) for a, b in zip(masks["torch"], masks["onnxruntime"]))
    assert not [r for r in caplog.records if r.name == "models.onnx_backend"]  # ONNX Runtime ran: no fallback


def test_the_pipelined_actor_gives_the_serial_actors_masks_areas_and_errors_in_order(tmp_path, checkpoint):
    """The predictor (as a plain class), pipelined (the next batch of windows gathered on one thread
    while the forward runs, each stitched image encoded on another) and serial, over images of
    several sizes whose windows share batches: byte-identical PNG chunks, equal class areas, the rows
    in the same order; an image whose encoding raises (a label of another size) is an errors row in
    both, its neighbours unharmed. The encoding ran on the encoder's thread (the serial actor's: its own)."""
    import threading

    from pipeline.config import load_config
    from pipeline.predict.predictor import Predictor
    from pipeline.rows import Prediction

    rng = np.random.default_rng(3)
    crops = [RGB[:70, :90], RGB[100:160, 200:300], RGB[200:240, :50], RGB[:33, 400:]]
    labels = [rng.integers(0, 3, c.shape[:2]).astype(np.uint8) for c in crops]
    labels[2] = labels[2][:-1]  # one row short: class areas cannot be counted against it
    images, batch = crops_batch(crops, labels)
    cfg = load_config(job_config(tmp_path, tmp_path, checkpoint, inference={"window": [32, 32], "stride": [24, 24], "batch_size": 5}))
    rows = {}
    for pipelined in (False, True):
        predictor = Predictor(cfg, pipelined=pipelined)
        threads: list[str] = []

        def encode(*args, threads=threads, encode=predictor._encode):
            threads.append(threading.current_thread().name)
            return encode(*args)

        predictor._encode = encode
        out = predictor(batch)
        rows[pipelined] = [Prediction.from_batch(out, i) for i in range(len(images))]
        assert set(threads) == {"segpipe-encode_0" if pipelined else threading.current_thread().name}, threads
    for serial, pipelined in zip(rows[False], rows[True]):
        assert pipelined.image_id == serial.image_id and pipelined.error == serial.error
        assert [c.mask for c in pipelined.chunks] == [c.mask for c in serial.chunks]
        if serial.areas is not None:
            for name in ("intersection", "union", "pred_area", "label_area"):
                assert np.array_equal(getattr(pipelined.areas, name), getattr(serial.areas, name))
    assert [r.image_id for r in rows[True]] == [f"{i}.png" for i in range(4)]
    assert [bool(r.error) for r in rows[True]] == [False, False, True, False] and rows[True][2].stage == "encode"
    assert all(r.areas is not None for i, r in enumerate(rows[True]) if i != 2)


def test_scores_holding_nan_or_inf_make_their_images_errors_rows_never_masks(tmp_path, checkpoint):
    """An argmax over NaN is a mask with nothing behind it (before: every pixel class 0, written without
    a word). The predictor (as a plain class) over three images whose windows share batches, its model
    giving NaN for the windows of one of them (a forward hook: where the input is white, as fp16's
    overflow would for one image): that image an errors row naming NonFiniteScores, the other two the
    masks of the model without the hook. A checkpoint with one NaN weight: every image an errors row,
    in slide and whole mode. check_finite names how many of a forward's inputs are not finite and,
    for fp16 or bf16, the precision."""
    from models.checkpoint import save_native
    from pipeline.config import load_config
    from pipeline.predict.predictor import NonFiniteScores, Predictor, check_finite
    from pipeline.rows import Prediction

    crops = [RGB[:70, :90], np.full((60, 100, 3), 255, np.uint8), RGB[200:240, :50]]
    _, batch = crops_batch(crops)
    cfg = load_config(job_config(tmp_path, tmp_path, checkpoint, inference={"window": [48, 48], "stride": [32, 32], "batch_size": 8}))
    clean = [Prediction.from_batch(Predictor(cfg)(batch), i) for i in range(3)]
    assert not any(row.error for row in clean)
    predictor = Predictor(cfg)
    model = predictor.score_fn.model
    white = float(model.normalize(torch.full((1, 3, 1, 1), 250.0)).min())

    def nan_where_white(module, inputs, output):
        output[inputs[0].flatten(1).amin(1) >= white] = float("nan")

    model.register_forward_hook(nan_where_white)
    rows = [Prediction.from_batch(predictor(batch), i) for i in range(3)]
    assert rows[1].error.startswith("NonFiniteScores: the model's outputs hold NaN or inf") and rows[1].stage == "predict"
    assert not rows[1].chunks
    for i in (0, 2):
        assert not rows[i].error and np.array_equal(decode_png(rows[i].chunks[0].mask), decode_png(clean[i].chunks[0].mask))

    broken = load_model(str(checkpoint))
    with torch.no_grad():
        next(p for p in broken.parameters() if p.ndim == 4)[0, 0, 0, 0] = float("nan")
    save_native(broken, tmp_path / "nan.safetensors")
    for mode in ("slide", "whole"):
        cfg = load_config(job_config(tmp_path, tmp_path, tmp_path / "nan.safetensors", inference={"mode": mode}))
        rows = [Prediction.from_batch(Predictor(cfg)(batch), i) for i in range(3)]
        assert all(row.error.startswith("NonFiniteScores") and not row.chunks for row in rows), mode

    scores = torch.zeros(3, 2, 4, 4)
    check_finite((scores,), "fp32")
    check_finite((torch.full((2, 3), 3e38),), "fp32")  # finite values whose sum overflows: no error
    scores[1, 0, 2, 2] = float("inf")
    with pytest.raises(NonFiniteScores, match=r"for 1 of the 3 inputs .*precision fp16"):
        check_finite((scores, torch.zeros(3, 5)), "fp16")
    with pytest.raises(NonFiniteScores, match=r"for 2 of the 3 inputs .*checkpoint's weights"):
        check_finite((scores, torch.tensor([[0.0], [0.0], [float("nan")]])), "fp32")
