"""Store faults seen by a whole job through real Ray: every worker process talks to S3 (moto on
loopback) through a fault-injecting proxy (tests/fault_proxy.py), and objects vanish after listing."""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
from fault_proxy import Fault, FaultProxy
from helpers import image_bytes, job_config, store_rows, tar_bytes

from pipeline.config import load_config
from pipeline.io.source import ImageFolderReader
from pipeline.plan import run_job

NUM_CLASSES = 3
SHARDS, PER_SHARD = 4, 3


def _sample(rng, h=48, w=40):
    return image_bytes(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), image_bytes(rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8))


def _job(input_uri: str, output_uri: str, checkpoint, options: dict, fmt: str, output_options: dict | None = None, **extra) -> dict:
    """A whole-image job; the output gets the input's storage options unless given its own."""
    return job_config(
        Path(),
        input_uri,
        checkpoint,
        run_id="faults",
        input={"format": fmt, "storage_options": options},
        inference={"mode": "whole"},
        output={"uri": output_uri, "storage_options": options if output_options is None else output_options},
        **extra,
    )


def test_a_tar_job_over_a_faulty_endpoint_retries_and_reads_every_image_once(ray_session, s3, checkpoint):
    rng = np.random.default_rng(3)
    src, dst = s3.bucket("faulty-archive"), s3.bucket("faulty-runs")
    expected = []
    for s in range(SHARDS):
        members = []
        for i in range(PER_SHARD):
            key = f"k{s}{i}"
            image, label = _sample(rng)
            members += [(f"{key}.png", image), (f"{key}.label.png", label)]
            expected.append(f"shard-{s:05d}.tar/{key}")
        s3.fs.pipe(f"{src[5:]}/shards/shard-{s:05d}.tar", tar_bytes(members))
    bucket = src[5:]
    faults = [
        # s3fs retries a throttled call 5 times itself; the 6th failure reaches our retry layer
        Fault("list", bucket, "slowdown", times=6),
        # shard 0 breaks half-way through a body, past its first block (a read after the stream's start)
        Fault("get", bucket, "drop", times=6, key="shard-00000", past_start=True),
        Fault("get", bucket, "slowdown", times=6, key="shard-00001"),
        # s3fs does not retry a 500: our layer does, twice
        Fault("get", bucket, "internal", times=2, key="shard-00002"),
        # throttling that s3fs absorbs by itself: never counted as ours
        Fault("get", bucket, "slowdown", times=2, key="shard-00003"),
    ]
    with FaultProxy(s3.endpoint_url, faults) as proxy:
        # botocore retries 5xx on its own by default: off here, so that what our layer retries shows
        options = {**s3.storage_options, "endpoint_url": proxy.url, "config_kwargs": {"retries": {"total_max_attempts": 1}}}
        # several ranged GETs per shard, so that a break lands mid-stream (reads only: s3fs wants 5 MiB parts to write)
        input_options = {**copy.deepcopy(options), "default_block_size": 8 * 1024}
        cfg = _job(src + "/shards", dst, checkpoint, input_options, "tar", output_options=options)
        result = run_job(load_config(cfg), progress=lambda _: None)
    assert result.status == "succeeded", result.message
    assert [(f.kind, f.injected) for f in faults] == [(f.kind, f.times) for f in faults]  # every fault was hit
    assert proxy.requests["get", bucket] > SHARDS * 3  # ranged reads through the proxy, retries included

    run = f"{dst[5:]}/faults"
    masks = [r["image_id"] for r in store_rows(s3.fs, run, "masks")]
    assert sorted(masks) == expected  # every image, none twice, none missing
    assert len(store_rows(s3.fs, run, "metrics")) == len(expected)
    assert store_rows(s3.fs, run, "errors") == []
    run_json = json.loads(s3.fs.cat_file(run + "/run.json"))
    store = run_json["attempts"][-1]["store"]
    assert 0 < store["retries"] <= proxy.injected
    assert store["failures"] == 0 and store["list_calls"] == 1 and store["listed_keys"] == SHARDS
    # run.json records the options as given (botocore rewrites a retries dict it is handed in place)
    assert run_json["config"]["input"]["storage_options"]["config_kwargs"] == {"retries": {"total_max_attempts": 1}}


def test_objects_gone_after_listing_are_not_found_error_rows_never_retried(ray_session, s3, checkpoint, monkeypatch):
    rng = np.random.default_rng(4)
    bucket = s3.bucket("vanishing")[5:]
    names = ["a", "b", "c", "d"]
    for name in names:
        image, label = _sample(rng, 36, 44)
        s3.fs.pipe({f"{bucket}/images/{name}.png": image, f"{bucket}/labels/{name}.png": label})
    gone = {"b.png": f"s3://{bucket}/labels/b.png", "c.png": f"s3://{bucket}/images/c.png"}

    listed = []

    def list_then_delete(self, stats=None):  # the driver lists; then the objects disappear
        units = list(original(self, stats))
        listed.extend(u for unit in units for u in unit.uris)
        s3.fs.rm([uri[5:] for uri in gone.values()])
        return iter(units)

    original = ImageFolderReader.iter_units
    monkeypatch.setattr(ImageFolderReader, "iter_units", list_then_delete)
    cfg = _job(f"s3://{bucket}/images", f"s3://{bucket}/runs", checkpoint, s3.storage_options, "images", max_error_fraction=0.6)
    cfg["input"]["labels"] = {"uri": f"s3://{bucket}/labels"}
    result = run_job(load_config(cfg), progress=lambda _: None)

    assert len(listed) == 4 and gone["c.png"] in listed
    assert result.status == "succeeded", result.message
    run = f"{bucket}/runs/faults"
    errors = {r["image_id"]: r for r in store_rows(s3.fs, run, "errors")}
    assert sorted(errors) == sorted(gone)
    for image_id, uri in gone.items():
        assert errors[image_id]["stage"] == "read"
        assert f"{uri}: not found" in errors[image_id]["error"], errors[image_id]["error"]
    assert sorted(r["image_id"] for r in store_rows(s3.fs, run, "masks")) == ["a.png", "d.png"]
    assert sorted(r["image_id"] for r in store_rows(s3.fs, run, "metrics")) == ["a.png", "d.png"]
    store = json.loads(s3.fs.cat_file(run + "/run.json"))["attempts"][-1]["store"]
    assert store["retries"] == 0 and store["failures"] == 2  # not found is never retried


def test_the_listing_keeps_names_not_info_dicts_in_one_paged_call(s3):
    """The driver's listing of an S3 prefix leaves no listing cache behind (s3fs's find keeps an info
    dict per object for the filesystem's life: hundreds of MB for a million keys) and is still one
    paged ListObjectsV2, nothing per object."""
    from pipeline.io.storage import StoreStats, list_files

    bucket = s3.bucket("names-only")[5:]
    s3.fs.pipe({f"{bucket}/p/{d}/{i}.png": b"x" for d in ("a", "b") for i in range(3)} | {f"{bucket}/other.png": b"x"})
    options = {k: v for k, v in s3.storage_options.items() if k != "use_listings_cache"}  # s3fs's default: on
    counted = fsspec.filesystem("s3", **options)  # the instance list_files gets (fsspec caches them by options)
    counted.connect()
    requests = Counter()
    counted.s3.meta.events.register("before-call.s3", lambda event_name, **_: requests.update([event_name.rsplit(".", 1)[-1]]))
    stats = StoreStats()
    fs, _root, keys = list_files(f"s3://{bucket}/p", options, stats=stats)
    assert fs is counted
    assert keys == [f"{d}/{i}.png" for d in ("a", "b") for i in range(3)]
    assert dict(requests) == {"ListObjectsV2": 1} and stats.listed_keys == 6
    assert len(fs.dircache) == 0
