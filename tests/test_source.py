"""pipeline.source: image folders listed on the driver in units of keys (labels paired by relative key),
read unit by unit, ids already committed dropped; `reader_for` picks the reader of input.format."""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.rows import IdSet
from pipeline.source import glob_regex, reader_for


def test_glob_double_star_matches_any_depth_including_none():
    assert glob_regex("**/*.png").match("a.png") and glob_regex("**/*.png").match("x/y/a.png")
    assert not glob_regex("*.png").match("x/a.png")
    assert not glob_regex("**/*.png").match("a.png.txt")
    assert glob_regex("cam?/*.jpg").match("cam1/z.jpg")


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
