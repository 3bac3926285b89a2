"""Stores for tests: a real S3 endpoint on loopback (moto's server, s3fs pointed at it) and a flaky
filesystem that fails the first reads of chosen objects with transient errors.

Tests request the `s3` fixture (tests/conftest.py, one server per session, started by
`s3_endpoint` here); the flaky filesystem is registered as `flaky://` when this module is imported.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import fsspec
from fsspec.spec import AbstractFileSystem

# Credentials the fake endpoint accepts (moto takes any): distinctive strings, so tests can scan
# outputs for them.
ACCESS_KEY = "AKIASEGPIPETESTKEY01"
SECRET_KEY = "segpipe-test-secret-5d1f8a2e-do-not-log"

_bucket_numbers = itertools.count()


@dataclass
class S3Server:
    endpoint_url: str
    storage_options: dict = field(default_factory=dict)

    @property
    def fs(self):
        return fsspec.filesystem("s3", **self.storage_options)

    def bucket(self, stem: str) -> str:
        """A new empty bucket (names are unique within the session), as 's3://name'."""
        name = f"{stem}-{next(_bucket_numbers)}"
        self.fs.mkdir(name)
        return f"s3://{name}"

    def requests(self):
        """A Counter of S3 operation names (ListObjectsV2, HeadObject, GetObject, ...) made from now on."""
        counts: Counter = Counter()
        fs = self.fs
        fs.connect()  # the client exists only after the first call otherwise

        def count(event_name: str, **_):
            counts[event_name.rsplit(".", 1)[-1]] += 1

        fs.s3.meta.events.register("before-call.s3", count)
        return counts

    def received(self):
        """A Counter, from now on, of the bytes of the bodies GetObject calls returned ("GetObject":
        what a reader fetched, read-ahead included), of those calls ("calls"), and of the keys that
        ListObjectsV2 pages returned ("listed")."""
        counts: Counter = Counter()
        fs = self.fs
        fs.connect()

        def count(parsed=None, model=None, **_):
            if model.name == "GetObject":
                counts["calls"] += 1
                counts["GetObject"] += int((parsed or {}).get("ContentLength") or 0)
            elif model.name == "ListObjectsV2":
                counts["listed"] += int((parsed or {}).get("KeyCount") or 0)

        fs.s3.meta.events.register("after-call.s3", count)
        return counts


@contextmanager
def s3_endpoint() -> Iterator[S3Server]:
    """An S3 endpoint on 127.0.0.1 (moto), with storage options that point s3fs at it; stopped on exit."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    options = {
        "endpoint_url": endpoint,
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "client_kwargs": {"region_name": "us-west-2"},
        "use_listings_cache": False,
    }
    try:
        yield S3Server(endpoint, options)
    finally:
        fsspec.filesystem("s3", **options).clear_instance_cache()
        server.stop()


# ---------------------------------------------------------------------------------------------
# Fault injection


def transient_error(kind: str) -> Exception:
    """The errors a store throws when it is briefly unwell, as the clients surface them."""
    if kind == "reset":
        return ConnectionResetError(104, "Connection reset by peer (injected)")
    if kind == "timeout":
        return TimeoutError("read timed out (injected)")
    if kind == "slowdown":  # S3 throttling as s3fs raises it: an OSError caused by botocore's ClientError
        from botocore.exceptions import ClientError
        from s3fs.errors import translate_boto_error

        cause = ClientError(
            {
                "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate. (injected)"},
                "ResponseMetadata": {"HTTPStatusCode": 503},
            },
            "GetObject",
        )
        return translate_boto_error(cause)
    raise ValueError(kind)


class FlakyFileSystem(AbstractFileSystem):
    """Wraps another filesystem; objects whose path contains `match` fail transiently at first.

    Each such object fails its first `fail_opens` opens, and its first `fail_reads` reads that
    start past its first byte (a stream that breaks half-way, then again on the reopened stream);
    the listing fails `fail_lists` times.
    Objects whose path contains `deny` raise PermissionError, as a store denying access does.
    `injected` counts the failures raised, `calls` every call by name. URIs are
    `flaky://<path in the target>`; give a distinct `run` to get fresh failure budgets.
    """

    protocol = "flaky"

    def __init__(
        self,
        target_protocol: str = "file",
        target_options: dict | None = None,
        match: str = "",
        fail_opens: int = 0,
        fail_reads: int = 0,
        fail_lists: int = 0,
        error: str = "reset",
        deny: str = "",
        run: str = "",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.target = fsspec.filesystem(target_protocol, **(target_options or {}))
        self.match, self.error, self.deny = match, error, deny
        self.fail_opens, self.fail_reads, self.lists_left = fail_opens, fail_reads, fail_lists
        self.opens_failed: Counter = Counter()
        self.reads_failed: Counter = Counter()
        self.injected = 0
        self.calls: Counter = Counter()

    def _flaky(self, path: str) -> bool:
        return bool(self.match) and self.match in path

    def _check_access(self, path: str) -> None:
        if self.deny and self.deny in path:
            raise PermissionError(13, "Access Denied (injected)", path)

    def _fail(self) -> None:
        self.injected += 1
        raise transient_error(self.error)

    def find(self, path, *args, **kwargs):
        self.calls["find"] += 1
        if self.lists_left > 0:
            self.lists_left -= 1
            self._fail()
        return self.target.find(path, *args, **kwargs)

    def ls(self, path, detail=True, **kwargs):
        self.calls["ls"] += 1
        return self.target.ls(path, detail=detail, **kwargs)

    def info(self, path, **kwargs):
        self.calls["info"] += 1
        return self.target.info(path, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self.calls["cat_file"] += 1
        self._check_access(path)
        if self._flaky(path) and self.opens_failed[path] < self.fail_opens:
            self.opens_failed[path] += 1
            self._fail()
        return self.target.cat_file(path, start=start, end=end, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        self.calls["open"] += 1
        self._check_access(path)
        if self._flaky(path) and self.opens_failed[path] < self.fail_opens:
            self.opens_failed[path] += 1
            self._fail()
        return _FlakyFile(self, path, self.target.open(path, mode, **kwargs))


class _FlakyFile:
    def __init__(self, fs: FlakyFileSystem, path: str, inner):
        self.fs, self.path, self.inner = fs, path, inner

    def read(self, size=-1):
        fs = self.fs
        # Reads past the object's start fail (on a reopened handle too), until the budget is spent.
        if self.inner.tell() > 0 and fs._flaky(self.path) and fs.reads_failed[self.path] < fs.fail_reads:
            fs.reads_failed[self.path] += 1
            fs._fail()
        return self.inner.read(size)

    def seek(self, *args):
        return self.inner.seek(*args)

    def tell(self):
        return self.inner.tell()

    # what pyarrow asks of a Python file it reads Parquet from
    @property
    def closed(self):
        return self.inner.closed

    def close(self):
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
