"""pipeline.io.source: image folders listed on the driver in units of keys (labels paired by relative key),
read unit by unit, ids already committed dropped; `reader_for` picks the reader of input.format."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.io.source import glob_regex, reader_for
from pipeline.rows import IdSet


def test_glob_double_star_matches_any_depth_including_none():
    assert glob_regex("**/*.png").match("a.png") and glob_regex("**/*.png").match("x/y/a.png")
    assert not glob_regex("*.png").match("x/a.png")
    assert not glob_regex("**/*.png").match("a.png.txt")
    assert glob_regex("cam?/*.jpg").match("cam1/z.jpg")


def test_wildcards_skip_hidden_names_as_glob_does_unless_the_pattern_names_the_dot(tmp_path):
    """macOS's AppleDouble `._a.jpg` beside `a.jpg` (an archive copied from a Mac), a `.thumbnails/`
    folder: before, both were listed as images (the one an errors row each, undecodable; the other
    segmented as more images). As glob.glob and a shell's globs, a wildcard does not match a name's
    leading dot, at any depth; a pattern naming the dot lists them."""
    import numpy as np
    from PIL import Image

    for name in ("a.jpg", "x/b.jpg", ".thumbnails/a.jpg", "x/.cache/c.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # AppleDouble: no JPEG

    def listed(pattern: str) -> list[str]:
        cfg = load_config({"input": {"uri": str(tmp_path), "pattern": pattern}, "model": {"name": "segformer-b0"}})
        return [i for u in reader_for(cfg.input).list_units() for i in u.image_ids]

    assert listed("**/*") == listed("**/*.jpg") == ["a.jpg", "x/b.jpg"]
    assert listed(".thumbnails/*.jpg") == [".thumbnails/a.jpg"] and listed("x/.cache/*") == ["x/.cache/c.jpg"]
    assert not glob_regex("?a.jpg").match(".a.jpg") and not glob_regex("**").match(".x/a.jpg")
    assert glob_regex("a*.jpg").match("a.b.jpg")  # a dot inside a name is any character


def test_listing_pairs_labels_of_other_extensions_preferring_png_and_drop_done_drops_ids_with_their_labels():
    fs = fsspec.filesystem("memory")
    fs.rm("/src", recursive=True) if fs.exists("/src") else None
    for key in ("a/1.jpg", "a/2.png", "b/3.png", "notes.txt"):
        fs.pipe(f"/src/images/{key}", b"x")
    for key in ("a/1.png", "a/1.tif", "b/3.png"):
        fs.pipe(f"/src/labels/{key}", b"y")
    cfg = load_config(
        {
            "input": {"uri": "memory://src/images", "labels": {"uri": "memory://src/labels"}, "images_per_unit": 2},
            "model": {"name": "segformer-b0"},
        }
    ).input
    reader = reader_for(cfg)
    units = reader.list_units()
    assert [u.image_ids for u in units] == [("a/1.jpg", "a/2.png"), ("b/3.png",)]
    assert units[0].label_uris[0].endswith("labels/a/1.png")  # .png preferred over .tif
    assert units[0].label_uris[1] is None
    samples = list(reader.read_unit(units[0]))
    assert [s.image_bytes for s in samples] == [b"x", b"x"] and samples[0].label_bytes == b"y"
    assert samples[1].label_bytes is None and not samples[1].has_label
    # resume: ids done are dropped, their labels with them; a unit left empty is dropped
    kept = reader.drop_done(units, IdSet(pa.array(["a/1.jpg", "b/3.png"])))
    assert len(kept) == 1 and kept[0].image_ids == ("a/2.png",) and kept[0].label_uris == (None,)
    assert kept[0].uris == (units[0].uris[1],) and kept[0].index == 0
    assert reader.drop_done(units, IdSet()) == units and reader.drop_done(units, IdSet(pa.array(["other.png"]))) == units


@pytest.mark.parametrize("uri, fmt", [("s/x.tar", "tar"), ("s/x.tar.gz", "tar"), ("s/t.parquet", "parquet"), ("s/images/", "images")])
def test_input_format_auto_is_resolved_once_by_the_config_and_picks_the_reader(uri, fmt):
    cfg = load_config({"input": {"uri": uri}, "model": {"name": "segformer-b0"}})
    readers = {"tar": "TarReader", "parquet": "ParquetReader", "images": "ImageFolderReader"}
    assert cfg.input.format == fmt and type(reader_for(cfg.input)).__name__ == readers[fmt]


@pytest.mark.parametrize("layout", ["inventory-parquet", "relative-csv"])
def test_listing_from_a_manifest_equals_listing_the_prefix(layout, tmp_path):
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    fs = fsspec.filesystem("memory")
    fs.rm("/inv", recursive=True) if fs.exists("/inv") else None
    for key in ("cam-1/a.png", "cam-1/b.jpg", "cam-2/c.png", "cam-2/notes.txt"):
        fs.pipe(f"/inv/archive/{key}", b"x")
    fs.pipe("/inv/other/d.png", b"x")  # outside the prefix
    keys = ["archive/cam-2/c.png", "archive/cam-1/a.png", "archive/cam-1/b.jpg", "archive/cam-2/notes.txt", "other/d.png"]
    if layout == "inventory-parquet":  # S3 Inventory: bucket-relative keys, a "key" column
        manifest = tmp_path / "inventory.parquet"
        pq.write_table(pa.table({"bucket": ["inv"] * len(keys), "key": keys, "size": [1] * len(keys)}), manifest)
        column = "key"
    else:  # a CSV of keys relative to input.uri
        manifest = tmp_path / "keys.csv"
        pa_csv.write_csv(pa.table({"path": [k.removeprefix("archive/") for k in keys[:4]]}), manifest)
        column = "path"
    base = {"uri": "memory://inv/archive", "pattern": "**/*", "images_per_unit": 2}
    listed = reader_for(load_config({"input": base, "model": {"name": "segformer-b0"}}).input).list_units()
    from_manifest = reader_for(
        load_config({"input": {**base, "manifest": str(manifest), "manifest_column": column}, "model": {"name": "segformer-b0"}}).input
    ).list_units()
    assert from_manifest == listed and [u.image_ids for u in listed] == [("cam-1/a.png", "cam-1/b.jpg"), ("cam-2/c.png",)]


def _pair_by_stem(image_keys: list[str], label_keys: list[str], extensions: list[str]) -> list[tuple[str, str | None]]:
    """The pairing by a held dict of every label (what the driver did before it streamed)."""
    from pathlib import PurePosixPath

    from pipeline.io.source import key_stem

    ranks = {e: i for i, e in enumerate(extensions)}
    best: dict[str, tuple[int, str]] = {}
    for key in label_keys:
        rank, stem = ranks[PurePosixPath(key).suffix], key_stem(key)
        if stem not in best or rank < best[stem][0]:
            best[stem] = (rank, key)
    return [(k, best[key_stem(k)][1] if key_stem(k) in best else None) for k in image_keys]


@pytest.mark.parametrize("seed", range(6))
def test_streamed_label_pairing_equals_pairing_by_stem_on_names_that_sort_apart(seed):
    """`pair_labels` reads two sorted listings side by side; stems do not sort like keys ("b-1.png"
    lists before "b.png", "b.png" before "b/x.png"), which is what these names are made of."""
    import random

    from pipeline.io.source import pair_labels

    rng = random.Random(seed)
    parts = ["b", "b-1", "b.c", "b_", "a", "c/d", "b/x", "b.c/y", "-"]
    stems = {"/".join(rng.choice(parts) for _ in range(rng.randint(1, 3))) for _ in range(60)}
    extensions = [".png", ".tif", ".jpg"]
    images = sorted(s + rng.choice([".png", ".jpg"]) for s in stems)
    labels = sorted({s + ext for s in stems for ext in extensions if rng.random() < 0.4} | {"zz-orphan.png", "b-0.tif"})
    expected = _pair_by_stem(images, labels, extensions)
    assert any(label for _, label in expected) and any(label is None for _, label in expected)
    assert list(pair_labels(images, labels, extensions)) == expected


def test_a_local_folder_is_walked_in_the_order_s3_lists_keys(tmp_path):
    from pipeline.io.storage import iter_files

    keys = ["b.png", "b-1.png", "b/x.png", "b/a/y.png", "b.c/z.png", "a.png", "B.png", "c/d/e/f.png"]
    for key in keys:
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
    _, _, listed = iter_files(str(tmp_path))
    assert list(listed) == sorted(keys)  # code-point order of the whole key, as ListObjectsV2 returns it


def test_the_listing_streams_units_and_pairs_labels_like_the_held_listing(tmp_path):
    """Through the reader on a local folder: streamed units equal units built from the held,
    sorted listing and a dict of labels by stem."""
    from pipeline.io.storage import list_files

    names = ["x/b.png", "x/b-1.png", "x/b/c.png", "y.jpg", "x/b.c.png"]
    for name in names:
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / name).write_bytes(b"x")
    for name in ["x/b.tif", "x/b.png", "x/b-1.png", "x/b/c.jpg", "y.png"]:
        (tmp_path / "labels" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "labels" / name).write_bytes(b"y")
    cfg = load_config(
        {
            "input": {"uri": str(tmp_path / "images"), "labels": {"uri": str(tmp_path / "labels")}, "images_per_unit": 2},
            "model": {"name": "segformer-b0"},
        }
    ).input
    units = list(reader_for(cfg).iter_units())
    _, _, keys = list_files(str(tmp_path / "images"))
    _, _, label_keys = list_files(str(tmp_path / "labels"))
    expected = _pair_by_stem(keys, label_keys, cfg.labels.extensions)
    got = [(i, label and label.split("/labels/")[1]) for u in units for i, label in zip(u.image_ids, u.label_uris)]
    assert got == expected and [u.index for u in units] == [0, 1, 2]
    assert dict(got)["x/b.png"] == "x/b.png" and dict(got)["x/b.c.png"] is None


def test_a_manifest_is_read_in_chunks_each_sorted(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.io.storage import iter_manifest

    keys = [*[f"k/{i:03d}.png" for i in range(10)][::-1], "k/003.png"]  # unsorted, one repeated
    pq.write_table(pa.table({"key": keys}), tmp_path / "m.parquet")
    _, _, listed = iter_manifest(str(tmp_path / "m.parquet"), str(tmp_path / "data"), {}, chunk=4)
    chunks = [sorted(set(keys[i : i + 4])) for i in range(0, len(keys), 4)]
    assert list(listed) == [k for chunk in chunks for k in chunk]


def test_slides_are_listed_by_every_reader_suffix_and_a_dicom_folder_once():
    """Slides of both readers are listed (tiffslide's .svs, OpenSlide's .mrxs, ...); a DICOM WSI's
    folder of .dcm files (one per level) is one slide, its first file; a MRXS's .dat files are not listed."""
    fs = fsspec.filesystem("memory")
    keys = [
        "a.svs",
        "b.mrxs",
        "b/Data0000.dat",
        "c/level-0.dcm",
        "c/level-1.dcm",
        "c/level-2.DCM",
        "d/e/x.dcm",
        "d/e/y.dcm",
        "f.czi",
        "g.vms",
    ]
    for key in keys:
        fs.pipe(f"/slides-listed/{key}", b"x")
    cfg = load_config({"input": {"uri": "memory://slides-listed", "format": "slide"}, "model": {"name": "segformer-b0"}}).input
    listed = [i for unit in reader_for(cfg).list_units() for i in unit.image_ids]
    assert listed == ["a.svs", "b.mrxs", "c/level-0.dcm", "d/e/x.dcm", "f.czi", "g.vms"]


def test_the_read_stage_gives_an_id_once_per_unit_and_says_what_it_left_out(tmp_path, caplog):
    """A tar shard whose sample's label comes after another sample: the reader gives that key twice
    (its image as a sample, then its late label as an error sample of the same id); the read stage
    sends the first and says the second in a warning, and the unit's end counts what it sent. Before,
    both went on, the writer took the id once and waited for a row more: the shard never committed,
    its good samples neither, and the run failed every time."""
    import io
    import logging
    import tarfile

    import numpy as np
    from helpers import image_bytes, job_config

    from pipeline.io.source import read_and_decode

    rng = np.random.default_rng(0)
    members = [
        ("j.png", image_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))),
        ("k.png", image_bytes(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))),
        ("j.label.png", image_bytes(np.zeros((8, 8), np.uint8))),
    ]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "s.tar").write_bytes(buffer.getvalue())
    cfg = load_config(job_config(tmp_path, tmp_path / "shards", tmp_path / "none.safetensors", input={"format": "tar"}))
    [unit] = reader_for(cfg.input).list_units()
    with caplog.at_level(logging.WARNING, logger="pipeline.io.source"):
        rows = list(read_and_decode(unit.to_record(), cfg=cfg))
    assert [(r["image_id"], r["error"]) for r in rows[:-1]] == [("s.tar/j", ""), ("s.tar/k", "")]
    assert rows[-1]["unit_rows"] == 2
    [warning] = [r.getMessage() for r in caplog.records]
    assert "image_id 's.tar/j' comes again in the same tar file (sample 'j': members are not adjacent" in warning


def test_a_file_listed_as_an_image_and_as_its_own_label_is_an_errors_row(tmp_path):
    """Images and masks in one folder, labels.uri the same folder, the default pattern: x.jpg pairs
    with the mask x.png, and x.png is listed as an image too, paired with itself. Before: the mask was
    segmented as a photo and scored against itself, counted in the metrics; now its errors row says
    why and what to change, and x.jpg is read with its label as before (rasters alike)."""
    import numpy as np
    from helpers import job_config, write_png
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.jpg")
    write_png(tmp_path / "x.png", np.zeros((4, 4), np.uint8))
    cfg = load_config(job_config(tmp_path, tmp_path, tmp_path / "none.safetensors", labels=tmp_path))
    reader = reader_for(cfg.input)
    samples = [s for unit in reader.list_units() for s in reader.read_unit(unit)]
    assert [(s.image_id, s.has_label) for s in samples] == [("x.jpg", True), ("x.png", True)]
    assert samples[0].error is None and samples[0].label_bytes is not None
    assert samples[1].error.startswith("x.png is its own label: input.uri and input.labels.uri list the same files")
