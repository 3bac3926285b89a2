"""Tar shards and Parquet image tables: read from local files, from an S3 endpoint on loopback (moto),
and through a store that fails transiently; every sample comes back exactly once."""

from __future__ import annotations

import io
import os
import tarfile

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import image_bytes, tar_bytes
from PIL import Image
from s3_server import SECRET_KEY

from pipeline.io.shards import list_parquet_units, list_tar_units, read_parquet_unit, read_tar_unit, split_member_name
from pipeline.io.storage import RetryPolicy, StoreError, StoreStats

FAST = RetryPolicy(attempts=6, initial_delay=0.001, max_delay=0.005)


def noise_png(seed: int, size: int = 64) -> bytes:
    return image_bytes(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def noise_jpg(seed: int) -> bytes:
    return image_bytes(Image.open(io.BytesIO(noise_png(seed))), "JPEG")


def label_png(seed: int, size: int = 64) -> bytes:
    return image_bytes(np.random.default_rng(seed).integers(0, 4, (size, size), dtype=np.uint8))


def end_of_member(raw: bytes, name: str) -> int:
    """The offset just past the (padded) data of member `name`: a header boundary."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        member = tar.getmember(name)
        return member.offset_data + -(-member.size // 512) * 512


# What each archive member holds, so tests can check the bytes that come back.
M = {
    "a.png": noise_png(1),
    "a.label.png": label_png(1),
    "b.jpg": noise_jpg(2),
    "b.label.png": label_png(2),
    "c.png": noise_png(3),
    "d.label.png": label_png(4),
    "f.png": noise_png(5),
    "f.label.png": label_png(5),
    "g.png": noise_png(6),
    "g.label.png": label_png(6),
    "h.png": noise_png(7),
    "h.label.png": label_png(7),
    "i.png": noise_png(8),
    "j.png": noise_png(9),
    "j.label.png": label_png(9),
    "k.png": noise_png(10),
    "k.label.png": label_png(10),
}


def build_archive() -> dict[str, bytes]:
    """Relative path -> bytes of a small archive with the cases a reader must get right."""
    truncated = tar_bytes([(n, M[n]) for n in ("h.png", "h.label.png", "i.png")])
    cut = end_of_member(truncated, "h.label.png") + 512 + len(M["i.png"]) // 2  # in the middle of i.png's data
    return {
        "train/shard-000.tar": tar_bytes(
            [
                ("a.png", M["a.png"]),
                ("a.label.png", M["a.label.png"]),
                ("a.json", b'{"split": "train"}'),
                ("b.jpg", M["b.jpg"]),
                ("b.label.png", M["b.label.png"]),  # a .jpg image with a .png label
                ("c.png", M["c.png"]),  # no label
                ("d.label.png", M["d.label.png"]),  # a label without an image
            ]
        ),
        "train/shard-001.tar.gz": tar_bytes(
            [
                ("./sub/f.png", M["f.png"]),
                ("./sub/f.label.png", M["f.label.png"]),
                ("g.png", M["g.png"]),
                ("g.label.png", M["g.label.png"]),
            ],
            gz=True,
        ),
        "shard-002.tar": truncated[:cut],  # a broken member: the shard stops inside i.png
        "shard-003.tar": tar_bytes(
            [  # j's label is not next to its image
                ("j.png", M["j.png"]),
                ("k.png", M["k.png"]),
                ("k.label.png", M["k.label.png"]),
                ("j.label.png", M["j.label.png"]),
            ]
        ),
        "notes.txt": b"not a shard",
    }


# image_id -> (image member, label member) for good samples, or the error text expected
EXPECTED_TAR = [
    ("shard-002.tar/h", "h.png", "h.label.png"),
    ("shard-002.tar/i", "error", "in member i.png"),
    ("shard-003.tar/j", "j.png", None),
    ("shard-003.tar/k", "k.png", "k.label.png"),
    ("shard-003.tar/j", "error", "not adjacent"),
    ("train/shard-000.tar/a", "a.png", "a.label.png"),
    ("train/shard-000.tar/b", "b.jpg", "b.label.png"),
    ("train/shard-000.tar/c", "c.png", None),
    ("train/shard-000.tar/d", "error", "no image member"),
    ("train/shard-001.tar.gz/sub/f", "f.png", "f.label.png"),
    ("train/shard-001.tar.gz/g", "g.png", "g.label.png"),
]


def build_tables() -> dict[str, bytes]:
    ids = ["t/0.png", "t/1.png", "t/2.png", "t/3.png", "t/4.png"]
    images = [noise_png(20 + i, 16) for i in range(5)]
    images[3] = None  # a row without image bytes
    labels = [label_png(20 + i, 16) for i in range(5)]
    labels[4] = None  # an unlabeled row
    plain = pa.table({"image_id": ids, "image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.binary())})
    # Hugging Face datasets' layout: the image is a struct {bytes, path}; integer ids
    hf_images = pa.array([{"bytes": noise_png(30 + i, 16), "path": f"{i}.png"} for i in range(3)])
    hf = pa.table({"image": hf_images, "image_id": [100, 101, 102], "label": pa.array([label_png(30 + i, 16) for i in range(3)])})
    out = {}
    for name, table, rows in (("tables/part-0.parquet", plain, 2), ("tables/part-1.parquet", hf, 10)):
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=rows)
        out[name] = sink.getvalue()
    return out


def write_tree(root, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def read_all(list_units, read_unit, uri, options=None, stats=None, **read_kwargs):
    units = list_units(uri, options, policy=FAST, stats=stats)
    return units, [s for unit in units for s in read_unit(unit, options, policy=FAST, stats=stats, **read_kwargs)]


def comparable(samples):
    """What must be equal wherever the archive is read from (error texts name different URIs)."""
    return [(s.unit, s.index_in_unit, s.image_id, s.image_bytes, s.label_bytes, s.has_label, s.error is None) for s in samples]


@pytest.fixture(scope="module")
def local_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    write_tree(root, build_archive() | build_tables())
    return str(root)


@pytest.fixture(scope="module")
def s3_archive(s3):
    bucket = s3.bucket("archive")
    for rel, data in (build_archive() | build_tables()).items():
        s3.fs.pipe(f"{bucket[5:]}/in/{rel}", data)
    return f"{bucket}/in"


# --- tar shards


def test_member_keys_follow_webdataset():
    assert split_member_name("dir/abc.label.png") == ("dir/abc", ".label.png")
    assert split_member_name("./x/y.JPG") == ("x/y", ".jpg")
    assert split_member_name("a.b/c.png") == ("a.b/c", ".png")  # only the base name's first dot counts
    assert split_member_name("dir/._abc.png")[0] == ""  # AppleDouble entries have no key


def test_tar_shards_from_local_files_give_every_sample_once_in_order_and_broken_members_as_errors(local_archive):
    stats = StoreStats()
    units, samples = read_all(list_tar_units, read_tar_unit, local_archive, stats=stats)
    assert [u.image_ids[0] for u in units] == ["shard-002.tar", "shard-003.tar", "train/shard-000.tar", "train/shard-001.tar.gz"]
    assert [u.index for u in units] == [0, 1, 2, 3]
    assert stats.list_calls == 1 and stats.retries == 0
    assert len(samples) == len(EXPECTED_TAR)
    for sample, (image_id, image, label) in zip(samples, EXPECTED_TAR):
        assert sample.image_id == image_id
        if image == "error":
            assert sample.error and label in sample.error and sample.image_bytes is None, sample
            continue
        assert sample.error is None, sample.error
        assert sample.image_bytes == M[image]
        assert sample.label_bytes == (M[label] if label else None)
        assert sample.has_label == (label is not None)
    assert [s.index_in_unit for s in samples if s.unit == 1] == [0, 1, 2]
    # the broken member names its shard; the truncated shard's good sample came back whole
    assert os.path.join(local_archive, "shard-002.tar") in samples[1].error


def test_tar_shards_from_s3_equal_local(s3, local_archive, s3_archive):
    requests = s3.requests()
    stats = StoreStats()
    units = list_tar_units(s3_archive, s3.storage_options, stats=stats)
    assert requests["ListObjectsV2"] == 1 and requests["HeadObject"] == 0  # one listing, no per-object calls
    assert stats.list_calls == 1 and stats.listed_keys == 7
    assert units[0].uris == (f"{s3_archive}/shard-002.tar",)
    samples = [s for u in units for s in read_tar_unit(u, s3.storage_options, policy=FAST, stats=stats)]
    _, local = read_all(list_tar_units, read_tar_unit, local_archive)
    assert comparable(samples) == comparable(local)
    assert f"{s3_archive}/shard-002.tar" in samples[1].error
    assert not any(SECRET_KEY in (s.error or "") for s in samples)


def test_label_suffix_is_configurable(tmp_path):
    (tmp_path / "s.tar").write_bytes(tar_bytes([("x.png", M["a.png"]), ("x.seg.png", M["a.label.png"])]))
    unit = list_tar_units(str(tmp_path / "s.tar"))[0]  # a single shard as the input uri
    assert unit.image_ids == ("s.tar",)
    [seg] = read_tar_unit(unit, label_suffix="seg.png")
    assert (seg.image_id, seg.image_bytes, seg.label_bytes) == ("s.tar/x", M["a.png"], M["a.label.png"])
    [default] = read_tar_unit(unit)  # .seg.png is then just another member, ignored
    assert default.label_bytes is None and not default.has_label
    [required] = read_tar_unit(unit, labels_required=True)
    assert required.error and ".label.png" in required.error


def test_shard_cut_at_a_member_boundary_is_an_error(tmp_path):
    raw = tar_bytes([("h.png", M["h.png"]), ("h.label.png", M["h.label.png"]), ("i.png", M["i.png"])])
    (tmp_path / "cut.tar").write_bytes(raw[: end_of_member(raw, "h.label.png")])  # no end-of-archive blocks
    samples = list(read_tar_unit(list_tar_units(str(tmp_path))[0]))
    assert [(s.image_id, s.error is None) for s in samples] == [("cut.tar/h", True), ("cut.tar", False)]
    assert "end-of-archive" in samples[1].error
    (tmp_path / "cut.tar").write_bytes(b"not a tar at all" * 100)
    [garbage] = read_tar_unit(list_tar_units(str(tmp_path))[0])
    assert garbage.image_id == "cut.tar" and "at its start" in garbage.error


# --- Parquet tables


EXPECTED_PARQUET = [  # (image_id, source of image bytes, has label, ok)
    ("t/0.png", 20, True, True),
    ("t/1.png", 21, True, True),
    ("t/2.png", 22, True, True),
    ("t/3.png", None, True, False),
    ("t/4.png", 24, False, True),
    ("100", 30, True, True),
    ("101", 31, True, True),
    ("102", 32, True, True),
]


def test_parquet_tables_read_the_same_rows_from_local_files_and_s3(s3, local_archive, s3_archive):
    kwargs = dict(label_column="label")
    units, local = read_all(list_parquet_units, read_parquet_unit, local_archive, **kwargs)
    assert [u.image_ids[0] for u in units] == ["tables/part-0.parquet", "tables/part-1.parquet"]
    assert [(s.image_id, s.has_label, s.error is None) for s in local] == [(i, h, ok) for i, _, h, ok in EXPECTED_PARQUET]
    for sample, (_, seed, _, ok) in zip(local, EXPECTED_PARQUET):
        if ok:
            assert sample.image_bytes == noise_png(seed, 16)
            assert sample.label_bytes == (label_png(seed, 16) if sample.has_label else None)
    assert "image is null" in local[3].error
    _, remote = read_all(list_parquet_units, read_parquet_unit, s3_archive, s3.storage_options, **kwargs)
    assert comparable(remote) == comparable(local)


def test_parquet_without_the_columns_is_one_error(tmp_path):
    pq.write_table(pa.table({"name": ["x"], "pixels": pa.array([b"123"])}), tmp_path / "t.parquet")
    [sample] = read_parquet_unit(list_parquet_units(str(tmp_path))[0])
    assert sample.image_id == "t.parquet" and "'image', 'image_id'" in sample.error and "name, pixels" in sample.error
    [renamed] = read_parquet_unit(list_parquet_units(str(tmp_path))[0], image_column="pixels", id_column="name")
    assert (renamed.image_id, renamed.image_bytes, renamed.error) == ("x", b"123", None)


# --- failures of the store


@pytest.mark.parametrize("error", ["reset", "timeout", "slowdown"])
def test_transient_failures_are_retried_and_every_sample_comes_once(local_archive, error):
    options = {
        "target_protocol": "file",
        "match": ".",
        "fail_opens": 2,
        "fail_reads": 2,
        "fail_lists": 1,
        "error": error,
        "run": f"local-{error}",
    }
    flaky = fsspec.filesystem("flaky", **options)
    stats = StoreStats()
    _, clean = read_all(list_tar_units, read_tar_unit, local_archive)
    units, samples = read_all(list_tar_units, read_tar_unit, "flaky://" + local_archive, options, stats)
    assert comparable(samples) == comparable(clean)
    paths = [u.uris[0][len("flaky://") :] for u in units]
    assert [(flaky.opens_failed[p], flaky.reads_failed[p]) for p in paths] == [(2, 2)] * len(units)  # broke half-way
    assert stats.retries == flaky.injected == 1 + 4 * len(units)
    assert stats.failures == 0 and flaky.calls["find"] == 2  # the listing failed once, then once more for good

    _, clean_tables = read_all(list_parquet_units, read_parquet_unit, local_archive, label_column="label")
    _, tables = read_all(list_parquet_units, read_parquet_unit, "flaky://" + local_archive, options, stats, label_column="label")
    assert comparable(tables) == comparable(clean_tables) and stats.retries == flaky.injected


def test_transient_failures_over_s3_are_retried_and_change_no_sample(s3, s3_archive):
    options = {
        "target_protocol": "s3",
        "target_options": s3.storage_options,
        "match": "train/",
        "fail_opens": 1,
        "fail_reads": 2,
        "error": "slowdown",
        "run": "s3",
    }
    flaky = fsspec.filesystem("flaky", **options)
    stats = StoreStats()
    _, clean = read_all(list_tar_units, read_tar_unit, s3_archive, s3.storage_options)
    _units, samples = read_all(list_tar_units, read_tar_unit, "flaky://" + s3_archive[len("s3://") :], options, stats)
    assert comparable(samples) == comparable(clean)
    assert stats.retries == flaky.injected == 2 * 3  # two shards under train/: each failed to open once, to read twice
    assert not any(SECRET_KEY in (s.error or "") for s in samples)


def test_failures_that_stay_end_the_shard_not_the_job(local_archive):
    options = {"target_protocol": "file", "match": "shard-000", "fail_reads": 100, "error": "reset", "run": "stays"}
    stats = StoreStats()
    _units, samples = read_all(list_tar_units, read_tar_unit, "flaky://" + local_archive, options, stats)
    broken = [s for s in samples if s.unit == 2]
    assert broken[-1].error and "still failing after 6 attempts" in broken[-1].error
    assert "shard-000.tar" in broken[-1].error
    assert len({(s.image_id, s.error is None) for s in samples}) == len(samples)  # nothing twice
    assert [s.image_id for s in samples if s.unit == 3] == ["train/shard-001.tar.gz/sub/f", "train/shard-001.tar.gz/g"]
    assert stats.retries == 5 and stats.failures == 1


def test_missing_and_denied_objects_are_errors_not_retries(s3, tmp_path):
    bucket = s3.bucket("missing")
    s3.fs.pipe(f"{bucket[5:]}/s/one.tar", tar_bytes([("x.png", M["a.png"])]))
    s3.fs.pipe(f"{bucket[5:]}/s/two.parquet", build_tables()["tables/part-0.parquet"])
    tar_unit = list_tar_units(f"{bucket}/s", s3.storage_options)[0]
    table_unit = list_parquet_units(f"{bucket}/s", s3.storage_options)[0]
    s3.fs.rm([f"{bucket[5:]}/s/one.tar", f"{bucket[5:]}/s/two.parquet"])  # gone between listing and reading
    stats = StoreStats()
    [gone] = read_tar_unit(tar_unit, s3.storage_options, policy=FAST, stats=stats)
    assert gone.image_id == "one.tar" and f"{bucket}/s/one.tar: not found" in gone.error
    [gone_table] = read_parquet_unit(table_unit, s3.storage_options, policy=FAST, stats=stats)
    assert gone_table.image_id == "two.parquet" and f"{bucket}/s/two.parquet: not found" in gone_table.error
    assert stats.retries == 0 and stats.failures == 2

    (tmp_path / "secret.tar").write_bytes(tar_bytes([("x.png", M["a.png"])]))
    options = {"target_protocol": "file", "deny": "secret.tar", "run": "deny"}
    flaky = fsspec.filesystem("flaky", **options)
    [denied] = read_tar_unit(list_tar_units(f"flaky://{tmp_path}", options)[0], options, policy=FAST, stats=stats)
    assert "access denied" in denied.error and str(tmp_path / "secret.tar") in denied.error
    assert flaky.calls["open"] == 1 and stats.retries == 0


def test_an_empty_prefix_is_a_store_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no shards here")
    with pytest.raises(StoreError, match=r"no \.tar"):
        list_tar_units(str(tmp_path))
