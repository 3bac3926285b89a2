"""Jobs over a real S3 endpoint on loopback (moto) and over shard formats: tar in, Parquet in."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import image_bytes, job_config, store_rows, tar_bytes
from s3_server import ACCESS_KEY, SECRET_KEY

from jobs.cli import main
from pipeline.config import load_config
from pipeline.plan import run_job

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(7)
    out = []
    for i, (h, w) in enumerate([(40, 52), (64, 48), (37, 70), (50, 50), (45, 61)]):
        out.append((f"s{i:03d}", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory, samples) -> Path:
    """Two WebDataset-style shards: KEY.png with KEY.label.png, adjacent."""
    root = tmp_path_factory.mktemp("shards")
    for s, part in enumerate((samples[:3], samples[3:])):
        members = [
            (name, image_bytes(array)) for key, image, label in part for name, array in ((f"{key}.png", image), (f"{key}.label.png", label))
        ]
        (root / f"shard-{s:05d}.tar").write_bytes(tar_bytes(members))
    return root


def job(input_uri: str, output_uri: str, checkpoint: Path, options: dict | None = None, fmt: str = "tar", **extra) -> dict:
    """A job from input_uri to output_uri, both with `options`; labels inside the shards."""
    options = options or {}
    return job_config(
        Path(),
        input_uri,
        checkpoint,
        run_id="s3job",
        input={"format": fmt, "labels": {}, "storage_options": options},
        output={"uri": output_uri, "storage_options": options},
        **extra,
    )


def tables(fs, run: str) -> dict[str, list[dict]]:
    return {kind: sorted(store_rows(fs, run, kind), key=lambda r: r["image_id"]) for kind in ("masks", "metrics", "errors")}


def test_tar_shards_from_s3_to_s3_equal_local_and_no_credential_is_written_or_printed(
    ray_session, s3, shards, checkpoint, tmp_path, capsys
):
    src, dst = s3.bucket("archive"), s3.bucket("runs")
    s3.fs.put(str(shards) + "/", src + "/shards/", recursive=True)
    remote = run_job(load_config(job(src + "/shards", dst, checkpoint, s3.storage_options)))
    local = run_job(load_config(job(str(shards), str(tmp_path / "runs"), checkpoint)))
    assert remote.status == local.status == "succeeded"
    got = tables(s3.fs, dst.removeprefix("s3://") + "/s3job")
    want = tables(fsspec.filesystem("file"), str(tmp_path / "runs" / "s3job"))
    assert [r["image_id"] for r in got["masks"]] == [
        "shard-00000.tar/s000",
        "shard-00000.tar/s001",
        "shard-00000.tar/s002",
        "shard-00001.tar/s003",
        "shard-00001.tar/s004",
    ]
    assert got == want and len(got["metrics"]) == 5 and got["errors"] == []
    assert remote.summary["mIoU"] == pytest.approx(local.summary["mIoU"])
    # no credential value in anything the run wrote, nor in what the job printed
    assert main(["run", "/dev/null"]) == 2  # (prints nothing secret either)
    printed = capsys.readouterr()
    for path in s3.fs.find(dst):
        data = s3.fs.cat_file(path)
        assert ACCESS_KEY.encode() not in data and SECRET_KEY.encode() not in data, path
    assert ACCESS_KEY not in printed.out + printed.err and SECRET_KEY not in printed.out + printed.err
    run_json = json.loads(s3.fs.cat_file(dst.removeprefix("s3://") + "/s3job/run.json"))
    assert run_json["config"]["input"]["storage_options"]["secret"] == "***"


def test_a_parquet_table_as_input_segments_every_row_and_scores_the_labeled_ones(ray_session, samples, checkpoint, tmp_path):
    # a last row repeats the id of the second (another image): only the first is segmented, with a
    # warning. Before, the file's unit never completed (the writer took the id once and waited for
    # one row more): the run failed without a mask, and every rerun the same way
    table = pa.table(
        {
            "image_id": [k for k, _, _ in samples] + [samples[1][0]],
            "image": [image_bytes(im) for _, im, _ in samples] + [image_bytes(samples[0][1])],
            "label": [image_bytes(lab) for _, _, lab in samples[:-1]] + [None, image_bytes(samples[0][2])],
        }
    )
    pq.write_table(table, tmp_path / "table.parquet", row_group_size=2)
    cfg = job(str(tmp_path / "table.parquet"), str(tmp_path / "runs"), checkpoint, fmt="auto")
    cfg["input"]["label_column"] = "label"
    result = run_job(load_config(cfg))
    assert result.status == "succeeded"
    rows = tables(fsspec.filesystem("file"), str(tmp_path / "runs" / "s3job"))
    assert [r["image_id"] for r in rows["masks"]] == [k for k, _, _ in samples]
    assert [r["image_id"] for r in rows["metrics"]] == [k for k, _, _ in samples[:-1]]  # the last has no label
    assert rows["masks"][1]["height"] == samples[1][1].shape[0]  # the first row of the id, not the last
    [warning] = json.loads((tmp_path / "runs" / "s3job" / "run.json").read_text())["attempts"][-1]["warnings"]
    assert f"image_id {samples[1][0]!r} comes again in the same parquet file" in warning
