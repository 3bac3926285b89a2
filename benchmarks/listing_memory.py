"""Driver memory of listing an S3 prefix of up to 1 000 000 images: keys, not bytes.

    .venv/bin/python benchmarks/listing_memory.py [--keys 100000 1000000] [--sizes 1024 5368709120] [--batch 250000]

The listing is s3fs's own code (find -> paged ListObjectsV2 -> info dicts -> names, its listings
cache included) over generated pages: `GeneratedS3` answers `list_objects_v2` with pages of 1000
objects (Key, Size, ETag, LastModified, StorageClass, as botocore parses them) instead of calling a
store, so a million keys need no million objects. Keys look like an archive's:
`archive/cam-0042/img-000042123.png`, 1000 per "directory". The claimed object sizes are whatever
`--sizes` says: the driver must not care.

Each case runs in its own fresh subprocess: `pipeline.io.source` ImageFolderReader.list_units (the driver's whole
listing: one recursive listing, then units of 64 images) with the units kept alive. Memory is the
resident set size (from /proc/self/status): `peak` is the highest RSS during the listing above the
RSS before it (VmHWM, reset with /proc/self/clear_refs), `held` is the RSS once the listing returned
with the units still referenced. Per key = held / keys. Needs Linux (/proc).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET, PREFIX, PER_DIR, PAGE = "bench", "archive", 1000, 1000


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def key_of(i: int) -> str:
    return f"{PREFIX}/cam-{i // PER_DIR:04d}/img-{i:09d}.png"


def generated_s3_class():
    """s3fs's S3FileSystem with its store calls answered from a generated listing."""
    import s3fs

    class GeneratedS3(s3fs.S3FileSystem):
        """`keys` objects of `size` bytes each under s3://bench/archive/; only listing is answered."""

        def __init__(self, *args, keys: int = 0, size: int = 0, **kwargs):
            super().__init__(*args, anon=True, **kwargs)
            self.keys, self.size = keys, size
            self.list_calls = 0
            self.modified = dt.datetime(2024, 6, 1, tzinfo=dt.timezone.utc)

        async def _call_s3(self, method, *args, **kwargs):
            if method != "list_objects_v2" or kwargs.get("Bucket") != BUCKET:
                raise NotImplementedError(f"GeneratedS3 answers listings only, not {method} {kwargs}")
            self.list_calls += 1
            start = int(kwargs.get("ContinuationToken") or 0)
            stop = min(self.keys, start + PAGE)
            prefix = kwargs.get("Prefix", "")
            contents = [
                {
                    "Key": key,
                    "Size": self.size,
                    "ETag": f'"{i:032x}"',
                    "StorageClass": "STANDARD",
                    "LastModified": self.modified.replace(second=i % 60),
                }
                for i in range(start, stop)
                if (key := key_of(i)).startswith(prefix)
            ]
            page = {"Contents": contents, "KeyCount": len(contents), "IsTruncated": stop < self.keys}
            if stop < self.keys:
                page["NextContinuationToken"] = str(stop)
            return page

    return GeneratedS3


def write_manifest(keys: int, path: Path) -> None:
    """An S3 Inventory-style Parquet manifest of the generated keys (bucket, key, size), written in
    row groups so that writing it holds no more than one of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("bucket", pa.string()), ("key", pa.string()), ("size", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, keys, 100_000):
            n = min(100_000, keys - start)
            writer.write_table(
                pa.table({"bucket": [BUCKET] * n, "key": [key_of(i) for i in range(start, start + n)], "size": [1] * n}, schema)
            )


def worker(keys: int, size: int, method: str, batch: int, manifest: str) -> None:
    """List `keys` generated keys in this process; print one JSON line."""
    import fsspec

    from pipeline.config import load_config
    from pipeline.io.source import reader_for
    from pipeline.io.storage import StoreStats
    from pipeline.plan import Listing

    fsspec.register_implementation("s3", generated_s3_class(), clobber=True)

    def config(n: int):
        source = {"manifest": manifest} if method == "manifest" else {}
        return load_config(
            {
                "input": {"uri": f"s3://{BUCKET}/{PREFIX}", "format": "images", "pattern": "**/*.png", "listing_batch": batch,
                          "storage_options": {"keys": n, "size": size}, **source},
                "model": {"name": "segformer-b0"},
            }
        )  # fmt: skip

    # warm up outside the measurement: imports that s3fs, botocore and pyarrow make lazily, the event loop thread
    reader_for(config(10).input.model_copy(update={"manifest": None})).list_units()
    cfg = config(keys)
    gc.collect()
    before = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the current RSS
    stats = StoreStats()
    start = time.perf_counter()
    units = 0
    if method in ("segpipe", "manifest"):  # the driver's listing: a batch at a time, as pipeline.plan runs them
        listing = Listing(cfg, stats)
        images = 0
        while (batch_units := listing.list_batch()) is not None:
            images += sum(len(u.uris) for u in batch_units)
            units += len(batch_units)
            held = None
        batch_units = None
    elif method == "held":  # the whole listing held: what the driver did before batches
        held = reader_for(cfg.input).list_units(stats)
        images, units = sum(len(u.uris) for u in held), len(held)
    else:  # s3fs's find, names kept, its listings cache left as it is
        held = fsspec.filesystem("s3", keys=keys, size=size).find(f"{BUCKET}/{PREFIX}")
        images = units = len(held)
    seconds = time.perf_counter() - start
    gc.collect()
    peak, after = rss_kib("VmHWM") - before, rss_kib("VmRSS") - before
    fs = fsspec.filesystem("s3", keys=keys, size=size)  # the cached instance the listing used
    print(
        json.dumps(
            {
                "method": method,
                "keys": keys,
                "size": size,
                "batch": batch if method in ("segpipe", "manifest") else None,
                "images": images,
                "units": units,
                "seconds": seconds,
                "peak_mib": peak / 1024,
                "held_mib": after / 1024,
                "pages": fs.list_calls,
                "cached_entries": sum(len(v) for v in fs.dircache.values()),
            }
        )
    )


def measure(keys: int, size: int, method: str, batch: int, manifest: str = "") -> dict:
    """One case in a fresh subprocess (its own peak RSS)."""
    command = [sys.executable, __file__, "--worker", str(keys), str(size), method, str(batch), manifest]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"worker {method} {keys} keys failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 5 * 2**30], help="claimed bytes per object")
    parser.add_argument("--batch", type=int, default=250_000, help="input.listing_batch (the default)")
    parser.add_argument("--no-baselines", action="store_true", help="leave out the held listing and s3fs's find")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), int(args.worker[1]), args.worker[2], int(args.worker[3]), args.worker[4])
        return

    most = max(args.keys)
    cases = [(k, args.sizes[0], "segpipe") for k in args.keys] + [(most, s, "segpipe") for s in args.sizes[1:]]
    cases.append((most, args.sizes[0], "manifest"))
    if not args.no_baselines:
        cases += [(most, args.sizes[0], "held"), (most, args.sizes[0], "s3fs-find")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "inventory.parquet"
        write_manifest(most, manifest)
        for keys, size, method in cases:
            rows.append(measure(keys, size, method, args.batch, str(manifest)))

    print("| listing | keys | batch | bytes per object (claimed) | LIST pages | listing s | peak MiB | peak bytes per key |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        assert r["images"] == r["keys"], r
        print(
            f"| {r['method']} | {r['keys']:,} | {r['batch'] or '-'} | {_human(r['size'])} | {r['pages']:,} "
            f"| {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['peak_mib'] * 2**20 / r['keys']:.0f} |"
        )
    ours = next(r for r in rows if r["method"] == "segpipe" and r["keys"] == most)
    per_key_listed = ours["seconds"] / most
    print()
    print(f"Projection to 100M keys (segpipe, batch {args.batch:,}): driver peak about {ours['peak_mib']:.0f} MiB (bounded by two batches,")
    print(f"not by the archive), listing time about {per_key_listed * 1e8 / 60:.0f} min of LIST pages, overlapped with segmentation.")
    print()
    print("segpipe: pipeline.plan Listing, batch after batch (each dropped once listed, as the plan drops it once run).")
    print("manifest: the same from an S3 Inventory-style Parquet file of the keys (local file), read a record batch at a time.")
    print("held: the whole listing as units kept alive (what the driver did before batches).")
    print("s3fs-find: s3fs's find() on the same pages, names kept.")
    print("Every case: paged ListObjectsV2 answered in process (GeneratedS3), 1000 keys a page, no HEAD;")
    print("peak: RSS above the RSS before the listing, at its highest; each case in a fresh subprocess.")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


if __name__ == "__main__":
    main()
