"""pipeline.analysis.export and `segpipe export`: a run's committed results as PNG label maps, tiled TIFFs and
COCO JSON (semantic annotations, instance results, panoptic PNGs), locally and on S3.

Run directories are built here with RunStore and the mask codec (no Ray): parts committed by their
masks file, run.json naming the classes and the task."""

from __future__ import annotations

import io
import json
import sys
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from pipeline.analysis.export import export_run
from pipeline.results.masks import ChunkedMaskWriter, encode_chunks
from pipeline.results.run_tables import ERRORS_SCHEMA, METRICS_SCHEMA, masks_schema
from pipeline.results.runstore import RunStore, read_mask
from pipeline.rows import MaskChunk

# pycocotools' decode under numpy 2 (its own code, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

NAMES = ["sky", "road", "car"]
INSTANCES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("instance_id", pa.int32()),
        ("class_id", pa.int32()),
        ("score", pa.float32()),
        ("bbox", pa.list_(pa.float64())),
        ("area", pa.int64()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("rle", pa.string()),
    ]
)
SEGMENTS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("segment_id", pa.int32()),
        ("class_id", pa.int32()),
        ("is_thing", pa.bool_()),
        ("score", pa.float32()),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.float64())),
    ]
)


def part(attempt: int, unit: int = 0) -> str:
    return f"part-a{attempt:04d}-u{unit:06d}-0000"


def masks_rows(image_id: str, chunks: list[MaskChunk], height: int, width: int) -> list[dict]:
    return [
        {"image_id": image_id, "height": height, "width": width}
        | {"chunk_y": c.y, "chunk_x": c.x, "chunk_height": c.height, "chunk_width": c.width, "mask": c.mask}
        for c in chunks
    ]


def new_run(output_uri: str, run_id: str, *, task: str = "semantic", names=NAMES, storage_options=None) -> RunStore:
    store = RunStore(output_uri, storage_options or {}, run_id)
    config = {"run_id": run_id, "inference": {"task": task} if task != "semantic" else {}}
    model = {"name": "tiny", "num_classes": len(names), "mask_classes": len(names), "class_names": list(names)}
    store.write_json("run.json", {"run_id": run_id, "status": "succeeded", "config": config, "model": model})
    return store


def commit(store: RunStore, name: str, masks: list[dict], **tables: pa.Table) -> None:
    """One part: its other tables (instances, segments) first, then masks (the commit)."""
    for kind, table in tables.items():
        store.fs.makedirs(store.path(kind), exist_ok=True)
        with store.fs.open(store.path(kind, name + ".parquet"), "wb") as f:
            pq.write_table(table, f)
    assert store.write_part(
        name, pa.Table.from_pylist(masks, masks_schema(False)), METRICS_SCHEMA.empty_table(), ERRORS_SCHEMA.empty_table()
    )


def labels(height: int, width: int, classes: int, seed: int) -> np.ndarray:
    """Blocks of random classes (8 x 8 pixels): regions, as a model's masks have."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, classes, (height // 8 + 1, width // 8 + 1))
    return np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:height, :width].astype(np.uint16 if classes > 256 else np.uint8)


@pytest.fixture
def semantic_run(tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    """Three images in two parts: one of them chunked (100 x 70 in chunks of 32)."""
    store = new_run(str(tmp_path / "runs"), "sem")
    images = {"a/img0.png": labels(40, 56, 3, 0), "a/img1.jpg": labels(33, 70, 3, 1), "big.tif": labels(100, 70, 3, 2)}
    rows = {k: masks_rows(k, encode_chunks(v, None, 32 if k == "big.tif" else None, 3), *v.shape) for k, v in images.items()}
    commit(store, part(1, 0), rows["a/img0.png"] + rows["a/img1.jpg"])
    commit(store, part(1, 1), rows["big.tif"])
    return str(tmp_path / "runs" / "sem"), images


# --------------------------------------------------------------------------- png


def test_png_export_equals_read_mask_for_each_image(semantic_run, tmp_path, capsys):
    run, images = semantic_run
    out = tmp_path / "png"
    assert main(["export", run, "--to", str(out), "--format", "png"]) == 0
    assert "3 files" in capsys.readouterr().out
    for image_id, name in (("a/img0.png", "a/img0.png"), ("a/img1.jpg", "a/img1.png"), ("big.tif", "big.png")):
        exported = np.asarray(Image.open(out / name))
        assert exported.dtype == np.uint8
        np.testing.assert_array_equal(exported, read_mask(run, image_id))
        np.testing.assert_array_equal(exported, images[image_id])


def test_png_skips_images_over_the_pixel_limit_and_keeps_16_bit_label_maps(tmp_path):
    names = [f"c{i}" for i in range(300)]
    store = new_run(str(tmp_path / "runs"), "wide", names=names)
    small, large = labels(20, 30, 300, 0), labels(60, 90, 300, 1)
    assert small.max() > 255
    commit(store, part(1), masks_rows("small.png", encode_chunks(small, None, None, 300), 20, 30))
    commit(store, part(1, 1), masks_rows("large.png", encode_chunks(large, None, 32, 300), 60, 90))
    result = export_run(str(tmp_path / "runs" / "wide"), str(tmp_path / "png"), "png", max_pixels=1000)
    assert result.written == ["small.png"]
    assert len(result.skipped) == 1 and result.skipped[0].startswith("large.png") and "--format tiff" in result.skipped[0]
    exported = np.asarray(Image.open(tmp_path / "png" / "small.png"))
    assert exported.dtype == np.uint16
    np.testing.assert_array_equal(exported, small)
    assert not (tmp_path / "png" / "large.png").exists()


def test_images_whose_names_differ_only_by_extension_get_files_of_their_own(tmp_path):
    store = new_run(str(tmp_path / "runs"), "twins")
    first, second = labels(16, 16, 3, 0), labels(16, 16, 3, 1)
    commit(store, part(1), masks_rows("x.jpg", encode_chunks(first, None, None, 3), 16, 16))
    commit(store, part(1, 1), masks_rows("x.png", encode_chunks(second, None, None, 3), 16, 16))
    result = export_run(str(tmp_path / "runs" / "twins"), str(tmp_path / "png"), "png")
    assert result.written == ["x.png", "x.png.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / "x.png")), first)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / "x.png.png")), second)
    # an image named as another's fallback ("x.jpg.png"), exported before it (x.jpg retried in attempt
    # 2): before, x.jpg's mask overwrote x.jpg.png's file, and the export counted three files
    store = new_run(str(tmp_path / "runs"), "triplet")
    third = labels(16, 16, 3, 2)
    commit(store, part(1), masks_rows("x.jpg.png", encode_chunks(third, None, None, 3), 16, 16))
    commit(store, part(1, 1), masks_rows("x.png", encode_chunks(second, None, None, 3), 16, 16))
    commit(store, part(2), masks_rows("x.jpg", encode_chunks(first, None, None, 3), 16, 16))
    result = export_run(str(tmp_path / "runs" / "triplet"), str(tmp_path / "png3"), "png")
    assert sorted(result.written) == ["x.jpg-2.png", "x.jpg.png", "x.png"]
    for name, want in (("x.jpg.png", third), ("x.png", second), ("x.jpg-2.png", first)):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png3" / name)), want)


def test_an_image_in_several_committed_parts_is_exported_from_the_latest(tmp_path):
    store = new_run(str(tmp_path / "runs"), "rerun")
    first, second = labels(16, 16, 3, 0), labels(16, 16, 3, 1)
    commit(store, part(1), masks_rows("x.png", encode_chunks(first, None, None, 3), 16, 16))
    commit(store, part(2), masks_rows("x.png", encode_chunks(second, None, None, 3), 16, 16))
    export_run(str(tmp_path / "runs" / "rerun"), str(tmp_path / "png"), "png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "png" / "x.png")), second)


# --------------------------------------------------------------------------- tiff


def test_tiled_tiff_of_a_chunked_12000_square_mask_equals_read_mask_in_bounded_memory(tmp_path):
    import tifffile

    size, chunk = 12000, 2048

    def pattern(y0: int, rows: int) -> np.ndarray:  # stripes and diagonals of 3 classes, band by band
        y, x = np.arange(y0, y0 + rows)[:, None], np.arange(size)[None]
        return ((y // 97 + x // 131 + (x + y) // 512) % 3).astype(np.uint8)

    writer = ChunkedMaskWriter(size, size, chunk, 3, binary=False)
    for y0 in range(0, size, 1000):  # never the whole mask: 1000-row bands through the codec
        writer.add(y0, pattern(y0, min(1000, size - y0)))
    store = new_run(str(tmp_path / "runs"), "huge")
    commit(store, part(1), masks_rows("scene.tif", writer.finish(), size, size))
    run = str(tmp_path / "runs" / "huge")
    small = new_run(str(tmp_path / "runs"), "small")
    commit(small, part(1), masks_rows("warm.png", encode_chunks(labels(8, 8, 3, 0), None, None, 3), 8, 8))
    export_run(str(tmp_path / "runs" / "small"), str(tmp_path / "warm"), "tiff")  # modules imported on first use are not the mask's

    tracemalloc.start()
    try:
        export_run(run, str(tmp_path / "tiff"), "tiff")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The whole uint8 mask is 12000 x 12000 = 144 MB. A band of chunks is 2048 x 12000 = 24.6 MB;
    # decoding adds Pillow's transient copy of one 2048 x 2048 chunk (4.2 MB), and the tiles a strip
    # of 512 x 12000 (6.1 MB) and that strip's tiles waiting for compression (6.1 MB): about 41 MB.
    # Bound: two bands of chunks, 49 MB, a third of the whole mask.
    print(f"peak of traced memory while exporting: {peak / 1e6:.1f} MB")
    assert peak < 2 * chunk * size, f"peak {peak / 1e6:.1f} MB"

    path = tmp_path / "tiff" / "scene.tif"
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (512, 512)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        assert page.dtype == np.uint8 and page.shape == (size, size)
    assert path.stat().st_size < size * size / 20  # compressed
    exported, expected = tifffile.imread(path), read_mask(run, "scene.tif")
    for y in range(0, size, 1000):  # compared band by band: no 144 MB temporary of booleans
        np.testing.assert_array_equal(exported[y : y + 1000], expected[y : y + 1000])


# --------------------------------------------------------------------------- coco


def test_semantic_coco_has_one_rle_annotation_per_image_and_class_present(semantic_run, tmp_path):
    from pycocotools.coco import COCO

    run, images = semantic_run
    assert main(["export", run, "--to", str(tmp_path / "coco"), "--format", "coco"]) == 0
    coco = COCO(str(tmp_path / "coco" / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == NAMES
    for image in coco.loadImgs(coco.getImgIds()):
        mask = images[image["file_name"]]
        assert (image["height"], image["width"]) == mask.shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert sorted(a["category_id"] for a in anns) == sorted(np.unique(mask).tolist())
        for ann in anns:
            np.testing.assert_array_equal(coco.annToMask(ann), mask == ann["category_id"])
            assert ann["area"] == int((mask == ann["category_id"]).sum()) and ann["iscrowd"] == 0


def instance_masks(height: int, width: int, boxes: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
    out = []
    for y, x, h, w in boxes:
        m = np.zeros((height, width), bool)
        m[y : y + h, x : x + w] = True
        m[y + h // 2, x : x + w // 2] = False  # not a plain box
        out.append(m)
    return out


def instances_table(image_id: str, masks: list[np.ndarray], classes: list[int], scores: list[float]) -> pa.Table:
    from pycocotools import mask as mask_utils

    rows = []
    for i, (m, c, s) in enumerate(zip(masks, classes, scores)):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        rows.append(
            {"image_id": image_id, "instance_id": i, "class_id": c, "score": s}
            | {"bbox": mask_utils.toBbox(rle).tolist(), "area": int(m.sum()), "height": m.shape[0], "width": m.shape[1]}
            | {"rle": rle["counts"].decode()}
        )
    return pa.Table.from_pylist(rows, INSTANCES_SCHEMA)


def test_instance_coco_results_load_in_pycocotools_and_decode_to_the_instance_masks(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    store = new_run(str(tmp_path / "runs"), "inst", task="instance")
    m1 = instance_masks(30, 40, [(2, 3, 10, 12), (15, 20, 12, 18)])
    m2 = instance_masks(25, 25, [(5, 5, 10, 10)])

    def rows(image_id: str, height: int, width: int) -> list[dict]:  # an instance run's masks rows: a label map each
        return masks_rows(image_id, encode_chunks(np.zeros((height, width), np.uint8), None, None, 3), height, width)

    # attempt 1 found one instance in p.png; attempt 2 redid p.png (the latest wins); an uncommitted part is ignored
    commit(store, part(1), rows("p.png", 30, 40), instances=instances_table("p.png", m1[:1], [0], [0.3]))
    commit(
        store,
        part(2),
        rows("p.png", 30, 40) + rows("q.png", 25, 25),
        instances=pa.concat_tables([instances_table("p.png", m1, [1, 2], [0.9, 0.8]), instances_table("q.png", m2, [2], [0.7])]),
    )
    stray = instances_table("q.png", instance_masks(25, 25, [(0, 0, 5, 5)]), [0], [0.99])
    with store.fs.open(store.path("instances", part(3) + ".parquet"), "wb") as f:
        pq.write_table(stray, f)

    assert main(["export", str(tmp_path / "runs" / "inst"), "--to", str(tmp_path / "coco"), "--format", "coco"]) == 0
    coco = COCO(str(tmp_path / "coco" / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == NAMES
    image_ids = {img["file_name"]: img["id"] for img in coco.loadImgs(coco.getImgIds())}
    assert sorted(image_ids) == ["p.png", "q.png"]
    results = coco.loadRes(str(tmp_path / "coco" / "coco_results.json"))
    expected = {("p.png", 1): m1[0], ("p.png", 2): m1[1], ("q.png", 2): m2[0]}
    anns = results.loadAnns(results.getAnnIds())
    assert len(anns) == len(expected)
    by_file = {v: k for k, v in image_ids.items()}
    for ann in anns:
        truth = expected[(by_file[ann["image_id"]], ann["category_id"])]
        np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), truth)
    # loadRes recomputes areas from the boxes; the file holds the masks' own
    written = json.loads((tmp_path / "coco" / "coco_results.json").read_text())
    assert sorted(r["area"] for r in written) == sorted(int(m.sum()) for m in expected.values())
    scores = {(by_file[a["image_id"]], a["category_id"]): round(a["score"], 5) for a in anns}
    assert scores == {("p.png", 1): 0.9, ("p.png", 2): 0.8, ("q.png", 2): 0.7}


def test_panoptic_png_ids_decode_to_the_segment_map_and_segments_info_matches_the_table(tmp_path):
    store = new_run(str(tmp_path / "runs"), "pan", task="panoptic")
    segment_map = np.zeros((48, 64), np.uint16)
    segment_map[:24] = 3
    segment_map[24:, :32] = 300  # past 255: the G channel counts
    segment_map[30:40, 40:60] = 7
    infos = [(3, 0, False, 0.9), (7, 2, True, 0.8), (300, 1, False, 0.7)]
    segments = pa.Table.from_pylist(
        [
            {"image_id": "s/pan.jpg", "segment_id": sid, "class_id": cls, "is_thing": thing, "score": score}
            | {"area": int((segment_map == sid).sum()), "bbox": [float(v) for v in _bbox(segment_map == sid)]}
            for sid, cls, thing, score in infos
        ],
        SEGMENTS_SCHEMA,
    )
    chunks = encode_chunks(segment_map, None, 32, 1000)  # 16-bit segment ids, chunked
    commit(store, part(1), masks_rows("s/pan.jpg", chunks, 48, 64), segments=segments)

    result = export_run(str(tmp_path / "runs" / "pan"), str(tmp_path / "coco"), "coco")
    assert sorted(result.written) == ["panoptic.json", "panoptic/s/pan.png"]
    rgb = np.asarray(Image.open(tmp_path / "coco" / "panoptic" / "s" / "pan.png")).astype(np.int64)
    np.testing.assert_array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2], segment_map)
    panoptic = json.loads((tmp_path / "coco" / "panoptic.json").read_text())
    assert panoptic["images"] == [{"id": 1, "file_name": "s/pan.jpg", "height": 48, "width": 64}]
    [ann] = panoptic["annotations"]
    assert (ann["image_id"], ann["file_name"]) == (1, "s/pan.png")
    table = segments.to_pylist()
    assert ann["segments_info"] == [
        {"id": r["segment_id"], "category_id": r["class_id"], "area": r["area"], "bbox": r["bbox"], "iscrowd": 0} for r in table
    ]
    assert [(c["id"], c["name"], c["isthing"]) for c in panoptic["categories"]] == [(0, "sky", 0), (1, "road", 0), (2, "car", 1)]


def test_an_image_committed_again_without_objects_exports_none_of_the_parts_before(tmp_path):
    """An image segmented again in a later part that found no instance (or segment): its export
    follows its latest mask, so it has none. Before: the earlier part's instances went to
    coco_results.json and QuPath, and segments_info listed a segment the exported PNG does not hold."""
    empty_instances = pa.Table.from_pylist([], INSTANCES_SCHEMA)
    store = new_run(str(tmp_path / "runs"), "inst", task="instance")
    zeros = encode_chunks(np.zeros((20, 30), np.uint8), None, None, 3)
    commit(
        store,
        part(1),
        masks_rows("x.png", zeros, 20, 30),
        instances=instances_table("x.png", instance_masks(20, 30, [(2, 3, 6, 7)]), [2], [0.9]),
    )
    commit(store, part(2), masks_rows("x.png", zeros, 20, 30), instances=empty_instances)
    export_run(str(tmp_path / "runs" / "inst"), str(tmp_path / "coco"), "coco")
    assert json.loads((tmp_path / "coco" / "coco_results.json").read_text()) == []
    export_run(str(tmp_path / "runs" / "inst"), str(tmp_path / "qupath"), "qupath")
    assert json.loads((tmp_path / "qupath" / "x.geojson").read_text())["features"] == []

    store = new_run(str(tmp_path / "runs"), "pan", task="panoptic")
    segment_map = np.zeros((16, 16), np.uint16)
    segment_map[4:10, 4:10] = 7
    segments = pa.Table.from_pylist(
        [{"image_id": "y.png", "segment_id": 7, "class_id": 2, "is_thing": True, "score": 0.8, "area": 36, "bbox": [4.0, 4.0, 6.0, 6.0]}],
        SEGMENTS_SCHEMA,
    )
    commit(store, part(1), masks_rows("y.png", encode_chunks(segment_map, None, None, 1000), 16, 16), segments=segments)
    blank = encode_chunks(np.zeros((16, 16), np.uint16), None, None, 1000)
    commit(store, part(2), masks_rows("y.png", blank, 16, 16), segments=pa.Table.from_pylist([], SEGMENTS_SCHEMA))
    export_run(str(tmp_path / "runs" / "pan"), str(tmp_path / "pan"), "coco")
    [ann] = json.loads((tmp_path / "pan" / "panoptic.json").read_text())["annotations"]
    assert ann["segments_info"] == []


def test_qupath_exports_class_255_of_a_run_that_is_no_slide_or_raster(tmp_path):
    """255 marks pixels not segmented only in slide and raster runs; a run of 300 classes over images
    has a class 255 like any other. Before: its regions were left out of the QuPath export."""
    names = [f"c{i}" for i in range(300)]
    store = new_run(str(tmp_path / "runs"), "wide", names=names)
    mask = np.zeros((12, 12), np.uint16)
    mask[:6] = 255
    mask[6:, 6:] = 256
    commit(store, part(1), masks_rows("img.png", encode_chunks(mask, None, None, 300), 12, 12))
    export_run(str(tmp_path / "runs" / "wide"), str(tmp_path / "qupath"), "qupath")
    features = json.loads((tmp_path / "qupath" / "img.geojson").read_text())["features"]
    assert sorted(f["properties"]["classification"]["name"] for f in features) == ["c0", "c255", "c256"]


def _bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


# --------------------------------------------------------------------------- stores and errors


def test_export_from_s3_to_s3_with_storage_options(s3):
    bucket = s3.bucket("export")
    store = new_run(f"{bucket}/runs", "s3run", storage_options=s3.storage_options)
    mask = labels(50, 40, 3, 5)
    commit(store, part(1), masks_rows("k/one.png", encode_chunks(mask, None, 32, 3), 50, 40))
    options = [
        f"endpoint_url={s3.storage_options['endpoint_url']}",
        f"key={s3.storage_options['key']}",
        f"secret={s3.storage_options['secret']}",
        "client_kwargs.region_name=us-west-2",
        "use_listings_cache=false",
    ]
    argv = ["export", f"{bucket}/runs/s3run", "--to", f"{bucket}/exported", "--format", "tiff"]
    assert main(argv + [a for o in options for a in ("--storage-option", o)]) == 0
    import tifffile

    data = s3.fs.cat_file(f"{bucket.removeprefix('s3://')}/exported/k/one.tif")
    np.testing.assert_array_equal(tifffile.imread(io.BytesIO(data)), mask)


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_directory_that_is_not_a_run_exits_2_with_one_line(tmp_path, capsys, where):
    run = tmp_path / where
    if where == "empty":
        run.mkdir()
    assert main(["export", str(run), "--to", str(tmp_path / "out"), "--format", "png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


def test_an_unknown_format_exits_2(semantic_run, tmp_path, capsys):
    run, _ = semantic_run
    with pytest.raises(SystemExit) as exit_:
        main(["export", run, "--to", str(tmp_path / "out"), "--format", "jpeg"])
    assert exit_.value.code == 2
    assert "invalid choice: 'jpeg'" in capsys.readouterr().err


def test_tiff_without_tifffile_exits_2_with_one_line_naming_the_tiff_extra_and_creates_no_folder(
    semantic_run, tmp_path, capsys, monkeypatch
):
    run, _ = semantic_run
    monkeypatch.setitem(sys.modules, "tifffile", None)  # as where the `tiff` extra is not installed: import fails
    assert main(["export", run, "--to", str(tmp_path / "out"), "--format", "tiff"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["segpipe: --format tiff needs tifffile: pip install 'segpipe[tiff]'"]
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- geotiff, cog (the `geo` extra)

ROTATED = (8.0, 1.5, 600_000.0, 1.2, -8.0, 5_100_000.0)  # 8 m pixels, turned a little


def raster_run(
    tmp_path, images: dict[str, tuple[np.ndarray, str | None, tuple | None]], chunk: int = 512, instances: pa.Table | None = None
) -> RunStore:
    """A raster run: each image's mask (chunked), CRS and transform in the masks table's raster columns;
    with `instances`, an instance run's, that table beside them."""
    store = new_run(str(tmp_path / "runs"), "geo", task="instance" if instances is not None else "semantic")
    rows = []
    for image_id, (mask, crs, transform) in images.items():
        for row in masks_rows(image_id, encode_chunks(mask, None, chunk, 3), *mask.shape):
            rows.append(row | {"crs": crs, "transform": list(transform) if transform else None, "resolution": None})
    assert store.write_part(
        part(1),
        pa.Table.from_pylist(rows, masks_schema(False, raster=True)),
        METRICS_SCHEMA.empty_table(),
        ERRORS_SCHEMA.empty_table(),
        objects={"instances": instances} if instances is not None else None,
    )
    return store


def test_geotiff_and_cog_keep_the_crs_a_rotated_transform_and_nodata_and_the_cog_is_valid_with_mode_overviews(tmp_path):
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    mask = labels(1100, 700, 3, 7)
    mask[:60] = 255  # no data
    raster_run(tmp_path, {"tiles/t1.tif": (mask, "EPSG:32633", ROTATED)})
    out = {}
    for fmt in ("geotiff", "cog"):
        result = export_run(str(tmp_path / "runs" / "geo"), str(tmp_path / fmt), fmt)
        assert result.written == ["tiles/t1.tif"] and not result.skipped
        out[fmt] = tmp_path / fmt / "tiles" / "t1.tif"
        with rasterio.open(out[fmt]) as ds:
            assert ds.crs.to_string() == "EPSG:32633" and tuple(ds.transform)[:6] == ROTATED and ds.nodata == 255
            assert ds.block_shapes == [(512, 512)] and ds.compression.name == "deflate"
            assert np.array_equal(ds.read(1), mask)
            assert ds.colormap(1)[255] == (0, 0, 0, 0) and ds.colormap(1)[1] != ds.colormap(1)[2]
    valid, errors, _ = cog_validate(str(out["cog"]))
    assert valid, errors
    with rasterio.open(out["cog"]) as ds:
        assert ds.overviews(1) == [2, 4]
        small = ds.read(1, out_shape=(1, 1100 // 4, 700 // 4))
        assert set(np.unique(small)) <= {0, 1, 2, 255}  # mode keeps labels: no value between two classes


def test_geo_export_skips_rasters_without_crs_and_refuses_runs_that_are_not_raster_runs(tmp_path, semantic_run, capsys):
    raster_run(tmp_path, {"plain.tif": (labels(20, 30, 3, 1), None, None), "utm.tif": (labels(20, 30, 3, 2), "EPSG:32633", ROTATED)})
    result = export_run(str(tmp_path / "runs" / "geo"), str(tmp_path / "out"), "geotiff")
    assert result.written == ["utm.tif"] and result.skipped == [
        "plain.tif: its raster has no CRS, so its mask has no place on a map (use --format tiff)"
    ]
    run_dir, _ = semantic_run
    assert main(["export", run_dir, "--to", str(tmp_path / "x"), "--format", "cog"]) == 2
    assert "not a raster run (its masks carry no CRS)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_polygons_rasterise_back_to_the_mask_join_pieces_cut_by_chunks_and_geojson_is_lon_lat(tmp_path):
    import geopandas as gpd
    from affine import Affine
    from rasterio.features import rasterize
    from shapely.affinity import affine_transform
    from shapely.geometry import box

    mask = labels(150, 130, 3, 3)
    mask[:10] = 255  # no data: in no polygon
    mask[40:90, 30:100] = 2  # one region over four chunks of 64
    raster_run(tmp_path, {"scene.tif": (mask, "EPSG:32633", ROTATED)}, chunk=64)
    run = str(tmp_path / "runs" / "geo")
    for fmt in ("geoparquet", "gpkg", "geojson"):
        assert export_run(run, str(tmp_path / fmt), fmt).written == [
            "scene" + {"geoparquet": ".parquet", "gpkg": ".gpkg", "geojson": ".geojson"}[fmt]
        ]
    frame = gpd.read_parquet(tmp_path / "geoparquet" / "scene.parquet")  # its `geo` metadata makes it geometry
    assert frame.crs.to_epsg() == 32633 and set(frame.columns) >= {"image_id", "class_id", "class_name", "area", "geometry"}
    back = rasterize(zip(frame.geometry, frame.class_id), out_shape=mask.shape, transform=Affine(*ROTATED), fill=255, dtype="uint8")
    assert np.array_equal(back, mask)  # pixel centres inside each region's polygon: every label back
    pixel = abs(ROTATED[0] * ROTATED[4] - ROTATED[1] * ROTATED[3])
    assert frame.area.sum() == pytest.approx((mask != 255).sum() * pixel) and frame["area"].sum() == pytest.approx(frame.area.sum())
    a, b, c, d, e, f = ROTATED
    rectangle = affine_transform(box(30, 40, 100, 90), [a, b, d, e, c, f]).buffer(-1.0)  # the block, in map units
    touching = [g for g in frame[frame.class_id == 2].geometry if g.intersects(rectangle)]
    assert len(touching) == 1 and touching[0].contains(rectangle)  # the region over four chunks is one polygon, not four
    gpkg = gpd.read_file(tmp_path / "gpkg" / "scene.gpkg")
    assert len(gpkg) == len(frame) and gpkg.crs.to_epsg() == 32633
    geojson = json.loads((tmp_path / "geojson" / "scene.geojson").read_text())
    lon, lat = np.array([c for f in geojson["features"] for c in f["geometry"]["coordinates"][0]]).T
    assert (lon > 14).all() and (lon < 18).all() and (lat > 45).all() and (lat < 47).all()  # UTM 33N, 600 km E, 5100 km N


def test_an_instance_runs_polygons_are_one_per_instance_with_its_class_score_and_area_and_rasterise_back(tmp_path):
    import geopandas as gpd
    from affine import Affine
    from rasterio.features import rasterize

    objects = instance_masks(150, 130, [(10, 10, 60, 40), (80, 70, 30, 50)])
    objects[1][100:104, 70:120] = False  # the second instance in two pieces: one MultiPolygon
    instances = pa.concat_tables([instances_table("scene.tif", objects, [2, 1], [0.9, 0.6]), instances_table("empty.tif", [], [], [])])
    mask = np.zeros((150, 130), np.uint8)  # the instance run's label map (not what its polygons come from)
    images = {"scene.tif": (mask, "EPSG:32633", ROTATED), "empty.tif": (mask[:20, :20], "EPSG:32633", ROTATED)}
    raster_run(tmp_path, images, chunk=64, instances=instances)
    run = str(tmp_path / "runs" / "geo")
    for fmt in ("geoparquet", "gpkg", "geojson"):
        assert sorted(export_run(run, str(tmp_path / fmt), fmt).written) == sorted(
            f"{name}{ {'geoparquet': '.parquet', 'gpkg': '.gpkg', 'geojson': '.geojson'}[fmt] }" for name in ("scene", "empty")
        )
    frame = gpd.read_parquet(tmp_path / "geoparquet" / "scene.parquet")
    assert frame.crs.to_epsg() == 32633 and list(frame.instance_id) == [0, 1] and list(frame.class_id) == [2, 1]
    assert list(frame.class_name) == ["car", "road"] and frame.score.tolist() == pytest.approx([0.9, 0.6])
    assert list(frame.geometry.geom_type) == ["Polygon", "MultiPolygon"]
    pixel = abs(ROTATED[0] * ROTATED[4] - ROTATED[1] * ROTATED[3])
    for geometry, instance, area in zip(frame.geometry, objects, frame["area"]):
        back = rasterize([(geometry, 1)], out_shape=(150, 130), transform=Affine(*ROTATED), fill=0, dtype="uint8")
        assert np.array_equal(back.astype(bool), instance) and area == pytest.approx(instance.sum() * pixel)
    assert len(gpd.read_parquet(tmp_path / "geoparquet" / "empty.parquet")) == 0
    gpkg = gpd.read_file(tmp_path / "gpkg" / "scene.gpkg")
    assert list(gpkg.instance_id) == [0, 1] and gpkg.score.tolist() == pytest.approx([0.9, 0.6])
    feature = json.loads((tmp_path / "geojson" / "scene.geojson").read_text())["features"][0]
    assert feature["properties"]["instance_id"] == 0 and feature["properties"]["class_name"] == "car"


def test_a_slides_tiff_is_a_pyramid_with_its_mpp_that_tiffslide_reads_back_level_by_level(tmp_path):
    """A slide run's tiff export: level 0 the mask with the target mpp as pixels per centimetre, then
    SubIFDs halving down to one tile, each every 2^k-th pixel of the mask (nearest: classes, never
    blends), whatever the chunks' cut (chunks of 21 rows and columns: no level's grid lines up with
    them); a slide that states no mpp gets the pyramid without resolution tags; other images stay one level."""
    import tifffile
    import tiffslide

    from pipeline.analysis.export import image_masks, mask_tiles, pyramid_factors, write_slide_tiff

    mask = np.random.default_rng(5).integers(0, 3, (70, 100)).astype(np.uint8)
    mask[:8] = 255  # no tissue
    store = new_run(str(tmp_path / "runs"), "slides")
    slide_rows = [r | {"mpp": mpp, "level0_scale": 2.0} for name, mpp in (("s.svs", 0.5), ("nompp.tif", None))
                  for r in masks_rows(name, encode_chunks(mask, None, 21, 3), 70, 100)]  # fmt: skip
    assert store.write_part(
        part(1),
        pa.Table.from_pylist(slide_rows, masks_schema(False, slide=True)),
        METRICS_SCHEMA.empty_table(),
        ERRORS_SCHEMA.empty_table(),
    )
    assert pyramid_factors(70, 100, 16) == [1, 2, 4, 8] and pyramid_factors(70, 100) == [1]
    assert export_run(str(tmp_path / "runs" / "slides"), str(tmp_path / "tiff"), "tiff").written == ["nompp.tif", "s.tif"]
    with tiffslide.TiffSlide(tmp_path / "tiff" / "s.tif") as slide:  # 512-tiles: one level here
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(0.5) and slide.level_dimensions == ((100, 70),)
        assert np.array_equal(np.asarray(slide.read_region((0, 0), 0, (100, 70), as_array=True))[..., 0], mask)
    with tiffslide.TiffSlide(tmp_path / "tiff" / "nompp.tif") as slide:  # no mpp stated: none made up
        assert slide.properties["tiffslide.mpp-x"] is None and slide.properties["tiff.ResolutionUnit"] == "NONE"

    # 16-tiles: four levels
    image = next(i for i in image_masks(store) if i.image_id == "s.svs")
    write_slide_tiff(image, str(tmp_path / "pyramid.tif"), 0.5, tile=16)
    with tiffslide.TiffSlide(tmp_path / "pyramid.tif") as slide:
        assert slide.properties["tiffslide.mpp-x"] == pytest.approx(0.5) and slide.properties["tiffslide.mpp-y"] == pytest.approx(0.5)
        assert slide.level_dimensions == ((100, 70), (50, 35), (25, 18), (13, 9))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0, 8.0), rel=0.1)
        for level, factor in enumerate([1, 2, 4, 8]):
            region = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level], as_array=True))[..., 0]
            assert np.array_equal(region, mask[::factor, ::factor]), level
    with tifffile.TiffFile(tmp_path / "pyramid.tif") as tif:  # each level's resolution: the mpp it has
        levels = tif.series[0].levels
        assert [v for lvl in levels for v in lvl.keyframe.resolution] == pytest.approx([2e4 / f for f in (1, 2, 4, 8) for _ in "xy"])
        assert {lvl.keyframe.resolutionunit for lvl in levels} == {tifffile.RESUNIT.CENTIMETER}
    tiles = list(mask_tiles(image, 16, 4))
    assert len(tiles) == 2 * 2 and np.array_equal(np.block([tiles[:2], tiles[2:]])[:18, :25], mask[::4, ::4])


# --------------------------------------------------------------------------- qupath


def test_qupath_of_an_instance_run_is_a_detection_per_instance_at_level_0_that_rasterises_back(tmp_path):
    store = new_run(str(tmp_path / "runs"), "qpi", task="instance")
    objects = instance_masks(30, 40, [(2, 3, 10, 12), (15, 20, 12, 18)])
    objects[1][20:22, :] = False  # in two pieces
    rows = [
        r | {"mpp": 0.5, "level0_scale": 4.0}
        for r in masks_rows("s.svs", encode_chunks(np.zeros((30, 40), np.uint8), None, None, 3), 30, 40)
    ]
    rows_other = [
        r | {"mpp": 0.5, "level0_scale": 4.0}
        for r in masks_rows("none.svs", encode_chunks(np.zeros((5, 5), np.uint8), None, None, 3), 5, 5)
    ]
    assert store.write_part(
        part(1),
        pa.Table.from_pylist(rows + rows_other, masks_schema(False, slide=True)),
        METRICS_SCHEMA.empty_table(),
        ERRORS_SCHEMA.empty_table(),
        objects={"instances": instances_table("s.svs", objects, [2, 0], [0.8, 0.4])},
    )
    result = export_run(str(tmp_path / "runs" / "qpi"), str(tmp_path / "qp"), "qupath")
    assert result.written == ["none.geojson", "s.geojson"]
    assert json.loads((tmp_path / "qp" / "none.geojson").read_text())["features"] == []
    found = json.loads((tmp_path / "qp" / "s.geojson").read_text())["features"]
    assert [f["properties"]["objectType"] for f in found] == ["detection", "detection"]
    assert [f["properties"]["classification"] for f in found] == [
        {"name": "car", "color": [44, 160, 44]},
        {"name": "sky", "color": [31, 119, 180]},
    ]
    assert [f["properties"]["measurements"]["instance_id"] for f in found] == [0, 1]
    assert [f["geometry"]["type"] for f in found] == ["Polygon", "MultiPolygon"]
    from PIL import ImageDraw

    for feature, instance in zip(found, objects):  # level 0 (4 x the mask), rasterised at the mask's pixel centres
        polygons = [feature["geometry"]["coordinates"]] if feature["geometry"]["type"] == "Polygon" else feature["geometry"]["coordinates"]
        canvas = Image.new("L", (40 * 4, 30 * 4), 0)
        draw = ImageDraw.Draw(canvas)
        for rings in polygons:
            for k, ring in enumerate(rings):
                draw.polygon([tuple(p) for p in ring], fill=255 if k == 0 else 0)
        back = np.asarray(canvas)[2::4, 2::4] > 0
        assert np.array_equal(back, instance)


def test_qupath_scales_a_slide_to_level_0_and_reads_a_run_written_before_the_mpp_columns(tmp_path):
    """A masks part without `mpp` / `level0_scale` (runs before slides) exports at the mask's own
    pixels; a slide's regions are scaled by its level0_scale."""
    store = new_run(str(tmp_path / "runs"), "qp")
    mask = np.zeros((8, 10), np.uint8)
    mask[2:5, 3:7] = 2
    commit(store, part(1), masks_rows("old.png", encode_chunks(mask, None, None, 3), 8, 10))
    slide_rows = [r | {"mpp": 0.5, "level0_scale": 4.0} for r in masks_rows("s.svs", encode_chunks(mask, None, None, 3), 8, 10)]
    slides = pa.Table.from_pylist(slide_rows, masks_schema(False, slide=True))
    assert store.write_part(part(2), slides, METRICS_SCHEMA.empty_table(), ERRORS_SCHEMA.empty_table())
    result = export_run(str(tmp_path / "runs" / "qp"), str(tmp_path / "qp"), "qupath")
    assert result.written == ["old.geojson", "s.geojson"]
    for name, scale in (("old.geojson", 1), ("s.geojson", 4)):
        collection = json.loads((tmp_path / "qp" / name).read_text())
        square = [f for f in collection["features"] if f["properties"]["classification"]["name"] == NAMES[2]]
        assert [f["geometry"]["coordinates"] for f in square] == [[[[3 * scale, 2 * scale], [7 * scale, 2 * scale], [7 * scale, 5 * scale],
                                                                   [3 * scale, 5 * scale], [3 * scale, 2 * scale]]]]  # fmt: skip
        background = [f for f in collection["features"] if f["properties"]["classification"]["name"] == NAMES[0]]
        assert len(background) == 1 and len(background[0]["geometry"]["coordinates"]) == 2  # the outline and the square's hole


def test_polygon_areas_of_a_geographic_crs_are_square_metres_on_its_ellipsoid_and_simplify_keeps_them(tmp_path, capsys):
    import geopandas as gpd
    import pyproj
    import shapely
    from shapely.geometry import box

    mask = np.zeros((120, 100), np.uint8)
    mask[20:70, 10:60] = 1  # a block of 50 x 50 pixels of 0.001 degrees
    mask[80:110, 65:95] = 2
    mask[85:95, 70:80] = 0  # a hole
    lonlat = (0.001, 0.0, 14.0, 0.0, -0.001, 46.0)
    raster_run(tmp_path, {"geo.tif": (mask, "EPSG:4326", lonlat)}, chunk=64)
    run = str(tmp_path / "runs" / "geo")
    assert export_run(run, str(tmp_path / "plain"), "geoparquet").written == ["geo.parquet"]
    frame = gpd.read_parquet(tmp_path / "plain" / "geo.parquet")
    block = frame[frame.class_id == 1]
    assert len(block) == 1
    # the reference: the block's corners in an equal-area projection (Lambert azimuthal, on the block)
    a, _, c, _, e, f = lonlat
    corners = box(c + 10 * a, f + 70 * e, c + 60 * a, f + 20 * e)
    laea = pyproj.Transformer.from_crs("EPSG:4326", "+proj=laea +lat_0=45.955 +lon_0=14.035 +datum=WGS84", always_xy=True)
    dense = shapely.segmentize(corners, 0.0001)  # edges that follow the projection's curvature
    equal_area = shapely.transform(dense, lambda xy: np.column_stack(laea.transform(xy[:, 0], xy[:, 1]))).area
    assert block["area"].iloc[0] == pytest.approx(equal_area, rel=1e-4)  # square metres, not degrees squared
    assert 2.1e7 < block["area"].iloc[0] < 2.2e7  # 50 x 50 pixels of about 77 m x 111 m at 46 N

    assert main(["export", run, "--to", str(tmp_path / "simple"), "--format", "geoparquet", "--simplify", "0.002"]) == 0
    simple = gpd.read_parquet(tmp_path / "simple" / "geo.parquet")
    assert list(simple["area"]) == list(frame["area"])  # the areas stay the pixels'
    assert shapely.get_num_coordinates(simple.geometry.values).sum() <= shapely.get_num_coordinates(frame.geometry.values).sum()
    assert all(s.is_valid for s in simple.geometry)
    assert main(["export", run, "--to", str(tmp_path / "x"), "--format", "cog", "--simplify", "1"]) == 2
    assert "--simplify" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_the_export_modules_first_docstring_line_lists_every_format():
    import re

    from pipeline.analysis import export

    first = export.__doc__.splitlines()[0]
    listed = re.search(r"--format ([a-z|]+)", first).group(1).split("|")
    assert listed == list(export.FORMATS)
