import fsspec
import pytest

from pipeline.config import load_config
from pipeline.decode import decode_sample
from pipeline.plan import plan_actors
from pipeline.rows import RawSample
from pipeline.source import glob_regex, reader_for


def test_glob_regex():
    assert glob_regex("**/*.png").match("a.png") and glob_regex("**/*.png").match("x/y/a.png")
    assert not glob_regex("*.png").match("x/a.png")
    assert not glob_regex("**/*.png").match("a.png.txt")
    assert glob_regex("cam?/*.jpg").match("cam1/z.jpg")


def test_memory_fs_listing_pairs_labels_with_other_extensions():
    fs = fsspec.filesystem("memory")
    fs.rm("/src", recursive=True) if fs.exists("/src") else None
    for key in ("a/1.jpg", "a/2.png", "b/3.png", "notes.txt"):
        fs.pipe(f"/src/images/{key}", b"x")
    for key in ("a/1.png", "a/1.tif", "b/3.png"):
        fs.pipe(f"/src/labels/{key}", b"y")
    cfg = load_config({"input": {"uri": "memory://src/images", "labels": {"uri": "memory://src/labels"}, "images_per_unit": 2},
                       "model": {"name": "segformer-b0"}}).input
    reader = reader_for(cfg)
    units = reader.list_units()
    assert [u.image_ids for u in units] == [("a/1.jpg", "a/2.png"), ("b/3.png",)]
    assert units[0].label_uris[0].endswith("labels/a/1.png")  # .png preferred over .tif
    assert units[0].label_uris[1] is None
    samples = list(reader.read_unit(units[0]))
    assert [s.image_bytes for s in samples] == [b"x", b"x"] and samples[0].label_bytes == b"y"
    assert samples[1].label_bytes is None and not samples[1].has_label
    # resume: ids done are dropped, their labels with them
    kept = reader.drop_done(units[0], {"a/1.jpg"})
    assert kept.image_ids == ("a/2.png",) and kept.label_uris == (None,)


@pytest.mark.parametrize("uri, fmt", [("s/x.tar", "tar"), ("s/x.tar.gz", "tar"), ("s/t.parquet", "parquet"), ("s/images/", "images")])
def test_input_format_auto_is_resolved_once_by_the_config(uri, fmt):
    cfg = load_config({"input": {"uri": uri}, "model": {"name": "segformer-b0"}})
    readers = {"tar": "TarReader", "parquet": "ParquetReader", "images": "ImageFolderReader"}
    assert cfg.input.format == fmt and type(reader_for(cfg.input)).__name__ == readers[fmt]


def test_decode_sample_rows():
    row = decode_sample(RawSample(3, 0, "x.png", b"", None), max_pixels=100)
    assert row.stage == "decode" and "empty" in row.error and row.unit == 3
    row = decode_sample(RawSample(3, 1, "y.png", None, None, error="read: boom"), max_pixels=100)
    assert row.stage == "read" and row.error == "read: boom" and not row.is_unit_end


@pytest.mark.parametrize(
    "cluster, resources, expect",
    [
        ({"CPU": 2}, {"actors": 1}, (1, 1.0, 0.0)),
        ({"CPU": 2}, {"actors": 2}, (2, 0.5, 0.0)),
        ({"CPU": 2}, {"actors": 1, "cpus_per_actor": 2}, (1, 1.0, 0.0)),  # lowered: tasks keep a CPU
        ({"CPU": 2}, {"actors": 8}, (4, 0.25, 0.0)),
        ({"CPU": 2}, {"actors": 2, "gpus_per_actor": 1}, (2, 0.5, 0.0)),  # no GPU: CPU actors
        ({"CPU": 16, "GPU": 2}, {"actors": 4, "gpus_per_actor": 1}, (2, 1.0, 1.0)),
    ],
)
def test_actor_sizing_leaves_a_cpu_to_tasks(cluster, resources, expect):
    cfg = load_config({"input": {"uri": "/x"}, "model": {"name": "segformer-b0"}, "resources": resources})
    plan = plan_actors(cfg, cluster)
    assert (plan.actors, plan.num_cpus, plan.num_gpus) == expect
    if not plan.num_gpus:
        assert plan.actors * plan.num_cpus <= cluster["CPU"] - 1 + 1e-9
        assert plan.threads == max(1, int(cluster["CPU"] // plan.actors))  # torch threads: the machine's share
