"""Jobs over a real S3 endpoint on loopback (moto) and over shard formats: tar in, Parquet in."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from s3_server import ACCESS_KEY, SECRET_KEY, s3  # noqa: F401  (the fixture)

from jobs.cli import main
from models import build_model, save_native
from pipeline.config import load_config
from pipeline.plan import run_job

NUM_CLASSES = 3


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


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
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            for key, image, label in part:
                for name, data in ((f"{key}.png", _png(image)), (f"{key}.label.png", _png(label))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    save_native(build_model("segformer-b0", num_classes=NUM_CLASSES, hidden_sizes=[16, 32, 64, 128], num_heads=[1, 1, 2, 4], decoder_dim=32), path)
    return path


def job(input_uri: str, output_uri: str, checkpoint: Path, options: dict | None = None, fmt: str = "tar", **extra) -> dict:
    cfg = {
        "run_id": "s3job",
        "input": {"uri": input_uri, "format": fmt, "labels": {}, "storage_options": options or {}},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {"mode": "slide", "window": [32, 32], "stride": [24, 24]},
        "output": {"uri": output_uri, "storage_options": options or {}},
    }
    cfg.update(extra)
    return cfg


def _tables(fs, run: str) -> dict[str, list[dict]]:
    out = {}
    for kind in ("masks", "metrics", "errors"):
        rows = []
        for path in sorted(fs.glob(f"{run}/{kind}/*.parquet")):
            with fs.open(path, "rb") as f:
                rows += pq.read_table(f).to_pylist()
        out[kind] = sorted(rows, key=lambda r: r["image_id"])
    return out


def test_tar_shards_from_s3_to_s3_equal_local(ray_session, s3, shards, checkpoint, tmp_path, capsys):  # noqa: F811
    import fsspec

    src, dst = s3.bucket("archive"), s3.bucket("runs")
    s3.fs.put(str(shards) + "/", src + "/shards/", recursive=True)
    remote = run_job(load_config(job(src + "/shards", dst, checkpoint, s3.storage_options)))
    local = run_job(load_config(job(str(shards), str(tmp_path / "runs"), checkpoint)))
    assert remote.status == local.status == "succeeded"
    got = _tables(s3.fs, dst.removeprefix("s3://") + "/s3job")
    want = _tables(fsspec.filesystem("file"), str(tmp_path / "runs" / "s3job"))
    assert [r["image_id"] for r in got["masks"]] == ["shard-00000.tar/s000", "shard-00000.tar/s001", "shard-00000.tar/s002", "shard-00001.tar/s003", "shard-00001.tar/s004"]
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


def test_parquet_table_in(ray_session, samples, checkpoint, tmp_path):
    table = pa.table({
        "image_id": [k for k, _, _ in samples],
        "image": [_png(im) for _, im, _ in samples],
        "label": [_png(lab) for _, _, lab in samples[:-1]] + [None],
    })
    pq.write_table(table, tmp_path / "table.parquet", row_group_size=2)
    cfg = job(str(tmp_path / "table.parquet"), str(tmp_path / "runs"), checkpoint, fmt="auto")
    cfg["input"]["label_column"] = "label"
    result = run_job(load_config(cfg))
    assert result.status == "succeeded"
    tables = _tables(__import__("fsspec").filesystem("file"), str(tmp_path / "runs" / "s3job"))
    assert [r["image_id"] for r in tables["masks"]] == [k for k, _, _ in samples]
    assert [r["image_id"] for r in tables["metrics"]] == [k for k, _, _ in samples[:-1]]  # the last has no label
