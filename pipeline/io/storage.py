"""Object stores through fsspec: opening a store, listing a prefix, retrying transient errors.

Every store is an fsspec filesystem opened from a URI and the config's `storage_options`
(`s3://` through s3fs, `gs://`, `az://`, `memory://`, local paths, ...). Three rules hold for all of them:

- Listing is one recursive listing per prefix (`fs.find`: for S3 that is paged ListObjectsV2 calls,
  1000 keys a page, read page by page), never a HEAD per object, and only the names are kept.
  `StoreStats.list_calls` counts them.
- Transient errors (timeouts, connection resets, 5xx, throttling) are retried with exponential
  backoff and jitter, and counted in `StoreStats.retries`. s3fs already retries some of them
  inside one call; this layer covers every store, errors s3fs gives up on, and a stream that breaks
  half-way: `RetryingFile` reopens the object at the offset it had reached, so a reader never sees
  a byte twice and a sample never comes back twice.
- A missing object or a denied access is not retried: it becomes a `StoreError` that names the URI
  and the reason, which the readers turn into an errors row.

`storage_options` hold credentials: this module's errors are scrubbed of their values
(pipeline.redaction's `scrub`, which the readers use too; `redact` gives a copy safe to show).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import logging
import os
import posixpath
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import fsspec
import fsspec.asyn

from pipeline.extras import store_package_missing
from pipeline.redaction import scrub

log = logging.getLogger("segpipe.storage")

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Opening and listing


def _url_to_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem and path for `uri`; a store whose package is missing (gs:// without gcsfs,
    ...) is one line, exit 2 (pipeline.extras)."""
    try:
        return fsspec.core.url_to_fs(uri, **copy.deepcopy(storage_options or {}))
    except ImportError as exc:
        raise store_package_missing(uri, exc) from None


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of `uri` and the path of `uri` inside it, without a trailing slash.

    The store gets a deep copy of the options: botocore rewrites `config_kwargs.retries` in place
    (`max_attempts: 1` becomes `total_max_attempts: 2, mode: legacy`), which would change the
    config that run.json records and the key of fsspec's instance cache.
    """
    fs, path = _url_to_fs(uri, storage_options)
    return fs, path.rstrip("/") or path


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as `fs.find` returns it, turned back into a URI that `open_fs` opens (`s3://b/k`, `/abs/k`)."""
    if "file" in _protocols(fs):
        return path  # local paths stay plain paths: they read better in ids and error rows
    return fs.unstrip_protocol(path)


def is_local(uri: str) -> bool:
    """A path on this machine's own file system (a plain path or file://)."""
    return "file" in _protocols(_url_to_fs(uri)[0])


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


@dataclass
class StoreStats:
    """What a stage did with a store: reported per read task and summed into run.json."""

    list_calls: int = 0  # recursive listings, one per prefix
    listed_keys: int = 0  # objects those listings returned
    retries: int = 0  # transient failures that were retried
    failures: int = 0  # operations that failed for good (missing, denied, or still failing)

    def add(self, other: StoreStats) -> StoreStats:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def list_files(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    suffixes: tuple[str, ...] | None = None,
    policy: RetryPolicy | None = None,
    stats: StoreStats | None = None,
) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """Every file under the prefix `uri` as (fs, root, sorted paths relative to root): `iter_files`, held."""
    fs, root, keys = iter_files(uri, storage_options, suffixes=suffixes, policy=policy, stats=stats)
    return fs, root, list(keys)


def iter_files(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    suffixes: tuple[str, ...] | None = None,
    policy: RetryPolicy | None = None,
    stats: StoreStats | None = None,
) -> tuple[fsspec.AbstractFileSystem, str, Iterator[str]]:
    """Every file under the prefix `uri` as (fs, root, paths relative to root in sorted order),
    streamed: one recursive listing whose keys arrive as it goes, never held whole.

    S3 is read page by page (ListObjectsV2, 1000 keys a page, each page retried when the store fails
    transiently) and a local folder directory by directory, both already in key order; other stores
    go through `find` and are sorted (held). `suffixes` filters by lower-cased name ending. A prefix
    with nothing under it gives nothing. The order is the one S3 lists in (code points), which lets
    `pipeline.io.source` pair images with labels from two such streams.
    """
    fs, root = open_fs(uri, storage_options)
    stats = stats if stats is not None else StoreStats()
    stats.list_calls += 1
    prefix = root.lstrip("/") + "/"

    def keys() -> Iterator[str]:
        for path in _iter_paths(fs, root, uri, policy, stats):
            bare = path.rstrip("/").lstrip("/")
            if not bare.startswith(prefix):
                continue  # the root itself when it is a file, or a store that echoes something odd
            stats.listed_keys += 1
            key = bare[len(prefix) :]
            if suffixes is None or key.lower().endswith(suffixes):
                yield key

    return fs, root, keys()


MANIFEST_CHUNK = 65_536  # keys read from a manifest at a time (a Parquet record batch, a CSV block)


def iter_manifest(
    manifest_uri: str,
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    column: str = "key",
    suffixes: tuple[str, ...] | None = None,
    stats: StoreStats | None = None,
    chunk: int = MANIFEST_CHUNK,
) -> tuple[fsspec.AbstractFileSystem, str, Iterator[str]]:
    """`iter_files` from a manifest instead of a listing: the keys in `column` of a Parquet or CSV
    file (an S3 Inventory report, say), streamed `chunk` keys at a time through a retrying reader.

    A key is relative to `uri`, or to its bucket when the manifest is an inventory: it has a
    `bucket` column, or its first keys start with `uri`'s own path (Inventory's keys do); then keys
    outside `uri` are left out. Each chunk comes sorted and without repeats (an inventory lists a
    key once; its order is the store's, not sorted)."""
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    fs, root = open_fs(uri, storage_options)
    mfs, mpath = open_fs(manifest_uri, storage_options)
    stats = stats if stats is not None else StoreStats()
    source = RetryingFile(mfs, mpath, uri=manifest_uri, stats=stats)
    try:
        if mpath.lower().endswith((".parquet", ".pq")):
            parquet = pq.ParquetFile(source)
            names = parquet.schema_arrow.names
            batches = parquet.iter_batches(batch_size=chunk, columns=[column]) if column in names else iter(())
        else:
            csv = pa_csv.open_csv(source, read_options=pa_csv.ReadOptions(block_size=max(chunk * 64, 1 << 20)))
            names = csv.schema.names
            batches = iter(csv)
    except StoreError:
        raise
    except Exception as exc:
        raise StoreError(manifest_uri, f"not a readable manifest ({type(exc).__name__}: {exc})") from None
    if column not in names:
        raise StoreError(manifest_uri, f"no column {column!r} (input.manifest_column); columns: {', '.join(names)}")
    bare = root.strip("/")
    prefix = (bare if "file" in _protocols(fs) else bare.split("/", 1)[-1] if "/" in bare else "") + "/"

    def keys() -> Iterator[str]:
        bucket_relative: bool | None = True if "bucket" in names and prefix != "/" else None
        try:
            for batch in batches:
                values = [str(k).lstrip("/") for k in batch.column(column).to_pylist() if k]
                if bucket_relative is None and values:
                    bucket_relative = prefix != "/" and any(k.startswith(prefix) for k in values)
                out = set()
                for key in values:
                    if bucket_relative:
                        if not key.startswith(prefix):
                            continue
                        key = key[len(prefix) :]
                    if suffixes is None or key.lower().endswith(suffixes):
                        out.add(key)
                stats.listed_keys += len(out)
                yield from sorted(out)
        finally:
            source.close()

    return fs, root, keys()


def _iter_paths(fs: fsspec.AbstractFileSystem, root: str, uri: str, policy: RetryPolicy | None, stats: StoreStats) -> Iterator[str]:
    """The path of every object under `root` in key order: one recursive listing, names only.

    s3fs's `find` builds an info dict (about 700 bytes) for every object before it returns the
    names, and keeps them all in its listings cache for as long as the filesystem lives (fsspec
    caches instances, so: the driver's life): a million keys held about 700 MB. For s3fs we read
    the pages of the same listing (ListObjectsV2 without a delimiter, 1000 keys a page) and pass on
    the names of each page as it comes; a local folder is walked in the same order; other stores go
    through `find` (retried whole), and their listings cache is dropped afterwards.
    benchmarks/listing_memory.py measures it.
    """
    if "s3" in _protocols(fs) and isinstance(fs, fsspec.asyn.AsyncFileSystem) and hasattr(fs, "_call_s3"):
        yield from _s3_pages(fs, root, uri, policy, stats)
    elif type(fs).__name__ == "LocalFileSystem":
        if os.path.isdir(root):
            yield from _walk_sorted(root)
    else:

        def find() -> list[str]:
            try:
                return fs.find(root)
            finally:
                fs.invalidate_cache()

        yield from sorted(p.rstrip("/") for p in with_retries(find, what="list", uri=uri, policy=policy, stats=stats))


def _s3_pages(fs: fsspec.AbstractFileSystem, root: str, uri: str, policy: RetryPolicy | None, stats: StoreStats) -> Iterator[str]:
    bucket, key, _ = fs.split_path(root)
    request = {"Bucket": bucket, "Prefix": key.strip("/") + "/" if key.strip("/") else "", **getattr(fs, "req_kw", {})}
    while True:
        page = with_retries(
            lambda: fsspec.asyn.sync(fs.loop, fs._call_s3, "list_objects_v2", **request), what="list", uri=uri, policy=policy, stats=stats
        )
        for item in page.get("Contents", []):
            yield f"{bucket}/{item['Key']}"
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _walk_sorted(directory: str) -> Iterator[str]:
    """Files under a local directory in the order S3 would list their keys: a directory `d` sorts
    as `d/`, so `d.png` comes before `d/x.png` and `d-1.png` before both."""
    with os.scandir(directory) as scan:
        entries = sorted(((e.name + "/" if e.is_dir() else e.name), e.path) for e in scan)
    for name, path in entries:
        if name.endswith("/"):
            yield from _walk_sorted(path)
        else:
            yield path


class StoreError(OSError):
    """An object that could not be read: `uri` and a short `reason` ("not found", "access denied", ...)."""

    def __init__(self, uri: str, reason: str, detail: str = ""):
        self.uri, self.reason, self.detail = uri, reason, detail
        super().__init__(f"{uri}: {reason}" + (f" ({detail})" if detail else ""))

    @property
    def missing(self) -> bool:
        """The object is not there (rather than there and unreadable)."""
        return self.reason == _REASONS["missing"]


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # tries in all, the first included
    initial_delay: float = 0.2  # seconds before the first retry
    max_delay: float = 20.0
    multiplier: float = 2.0
    jitter: float = 0.5  # up to this fraction of each delay is drawn at random, so tasks don't retry in step

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (retry - 1))
        return base * (1.0 - self.jitter * random.random())


DEFAULT_POLICY = RetryPolicy()

# Error codes of S3 (and of stores that mimic it) that mean "try again later".
_TRANSIENT_CODES = {
    "throttling",
    "throttlingexception",
    "slowdown",
    "requestlimitexceeded",
    "toomanyrequests",
    "requesttimeout",
    "requesttimeoutexception",
    "internalerror",
    "serviceunavailable",
    "503",
    "500",
    "502",
    "504",
    "429",
    "priorrequestnotcomplete",
    "bandwidthlimitexceeded",
}
# Exception class names of HTTP clients (botocore, aiohttp, urllib3, requests, http.client) that mean
# the connection or the response broke, matched by name so that this module imports none of them.
_TRANSIENT_NAMES = {
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ResponseStreamingError",
    "IncompleteReadError",
    "IncompleteRead",
    "HTTPClientError",
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ClientConnectionError",
    "ClientOSError",
    "ServerTimeoutError",
    "ProtocolError",
    "ChunkedEncodingError",
    "RemoteDisconnected",
    "FSTimeoutError",
    "ResponseParserError",
}
_TRANSIENT_ERRNOS = {
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.EPIPE,
    errno.EAGAIN,
    errno.EBUSY,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ENETRESET,
    getattr(errno, "EREMOTEIO", errno.EIO),  # s3fs: InternalError / 500
}


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """exc and the exceptions it was raised from (s3fs wraps botocore's ClientError, for one)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    for name in ("status", "status_code", "code"):  # aiohttp, requests, gcsfs HttpError
        value = getattr(exc, name, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", "")).lower()
    return ""


def classify(exc: BaseException) -> str:
    """'missing', 'denied', 'transient' or 'permanent': whether a failed store call is worth retrying."""
    links = list(_chain(exc))
    for e in links:  # a definite answer anywhere in the chain wins over a generic wrapper
        if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
            return "missing"
        if isinstance(e, PermissionError):
            return "denied"
        status, code = _http_status(e), _error_code(e)
        if status == 404 or code in {"nosuchkey", "nosuchbucket", "notfound"}:
            return "missing"
        if status in (401, 403) or code in {"accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "expiredtoken"}:
            return "denied"
    for e in links:
        status, code = _http_status(e), _error_code(e)
        if code in _TRANSIENT_CODES or status in (408, 429) or (status is not None and status >= 500):
            return "transient"
        if isinstance(e, (TimeoutError, ConnectionError)) or type(e).__name__ in _TRANSIENT_NAMES:
            return "transient"
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return "transient"
        if "SlowDown" in str(e) or "reduce your request rate" in str(e):
            return "transient"
    return "permanent"


_REASONS = {"missing": "not found", "denied": "access denied", "transient": "still failing after retries", "permanent": "read failed"}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def with_retries(
    call: Callable[[], T],
    *,
    what: str,
    uri: str,
    policy: RetryPolicy | None = None,
    stats: StoreStats | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """call(), retried on transient errors; any failure that stays is a StoreError naming `uri`.

    `what` ("read", "list", "open") goes into the log line of each retry.
    """
    policy = policy or DEFAULT_POLICY
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except StoreError:
            raise
        except Exception as exc:
            kind = classify(exc)
            if kind == "transient" and attempt < policy.attempts:
                wait = policy.delay(attempt)
                if stats is not None:
                    stats.retries += 1
                log.warning("%s %s: %s; retry %d/%d in %.2f s", what, uri, _describe(exc), attempt, policy.attempts - 1, wait)
                sleep(wait)
                continue
            if stats is not None:
                stats.failures += 1
            reason = _REASONS[kind]
            if kind == "transient":
                reason = f"still failing after {policy.attempts} attempts"
            elif kind == "permanent":
                reason = f"{what} failed"  # a write, a listing or an open fails as itself, not as a read
            raise StoreError(uri, reason, _describe(exc)) from exc
    raise AssertionError("unreachable")  # the loop returns or raises


class RetryingFile(io.RawIOBase):
    """A read-only, seekable view of one object that survives transient errors.

    A read that fails transiently closes the underlying file, waits, reopens the object and
    seeks back to the offset this view had reached, so a stream (a tar shard, a Parquet row
    group) goes on where it broke instead of starting over. Missing or denied objects, and
    errors that stay, raise StoreError. Consecutive failures of one read count against
    `policy.attempts`; a read that succeeds starts the count afresh.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        *,
        uri: str | None = None,
        policy: RetryPolicy | None = None,
        stats: StoreStats | None = None,
        sleep: Callable[[float], None] = time.sleep,
        block_size: int | None = None,
    ):
        super().__init__()
        self.fs, self.path, self.uri = fs, path, uri or path
        # fsspec's read-ahead block; None keeps the store's default (s3fs: 50 MB, too much for a header)
        self._open_kwargs = {"block_size": block_size} if block_size else {}
        self.policy = policy or DEFAULT_POLICY
        self.stats = stats if stats is not None else StoreStats()
        self._sleep = sleep
        self._pos = 0
        self._file = None
        with_retries(self._open_at_pos, what="open", uri=self.uri, policy=self.policy, stats=self.stats, sleep=sleep)

    def _open_at_pos(self) -> None:
        self._drop()
        f = self.fs.open(self.path, "rb", **self._open_kwargs)
        try:
            if self._pos:
                f.seek(self._pos)
        except BaseException:
            f.close()
            raise
        self._file = f

    def _drop(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """call(); after a transient failure, reopen at the current offset before calling again."""
        broken = False

        def attempt() -> T:
            nonlocal broken
            if broken or self._file is None:
                self._open_at_pos()
            try:
                return call()
            except Exception:
                broken = True
                raise

        return with_retries(attempt, what=what, uri=self.uri, policy=self.policy, stats=self.stats, sleep=self._sleep)

    # io.RawIOBase

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        n = len(data)
        memoryview(buffer).cast("B")[:n] = data
        return n

    def read(self, size: int = -1) -> bytes:
        if self.closed:
            raise ValueError("read of a closed file")
        data = self._retrying("read", lambda: self._file.read(-1 if size is None or size < 0 else size))
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = self._retrying("size", lambda: self._file.seek(0, io.SEEK_END)) + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self._pos = target
        self._retrying("seek", lambda: self._file.seek(target))
        return target

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._drop()
        super().close()


def read_bytes(
    fs: fsspec.AbstractFileSystem,
    path: str,
    *,
    uri: str | None = None,
    policy: RetryPolicy | None = None,
    stats: StoreStats | None = None,
) -> bytes:
    """The whole object at `path` (one GET), retried on transient errors; StoreError otherwise."""
    return with_retries(lambda: fs.cat_file(path), what="read", uri=uri or path, policy=policy, stats=stats)


@contextlib.contextmanager
def local_copy(uri: str, storage_options: dict[str, Any] | None = None, *, stats: StoreStats | None = None) -> Iterator[str]:
    """A local path for `uri` (a file or a directory): itself when local, else a temporary copy,
    fetched with retries on transient errors and removed on exit. FileNotFoundError when absent."""
    fs, path = open_fs(uri, storage_options)
    if "file" in _protocols(fs):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{uri}: no such file or directory")
        yield path
        return
    if not with_retries(lambda: fs.exists(path), what="stat", uri=uri, stats=stats):
        raise FileNotFoundError(f"{scrub(uri, storage_options)}: no such object or prefix")
    with tempfile.TemporaryDirectory(prefix="segpipe-copy-") as tmp:
        dest = os.path.join(tmp, posixpath.basename(path.rstrip("/")))
        with_retries(lambda: fs.get(path, dest, recursive=fs.isdir(path)), what="download", uri=uri, stats=stats)
        yield dest
