"""pipeline.io.storage: which errors are retried, backoff, resumable reads, one listing per prefix."""

from __future__ import annotations

import fsspec
import pytest
from s3_server import transient_error

from pipeline.io.storage import (
    RetryingFile,
    RetryPolicy,
    StoreError,
    StoreStats,
    classify,
    list_files,
    read_bytes,
    with_retries,
)


def client_error(code: str, status: int):
    """A botocore ClientError as s3fs raises it: translated to an OSError, the ClientError as its cause."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    return translate_boto_error(
        ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    )


@pytest.mark.parametrize(
    "exc, kind",
    [
        (FileNotFoundError("gone"), "missing"),
        (client_error("NoSuchKey", 404), "missing"),
        (PermissionError("no"), "denied"),
        (client_error("AccessDenied", 403), "denied"),
        (client_error("InvalidAccessKeyId", 403), "denied"),
        (ConnectionResetError(104, "reset"), "transient"),
        (TimeoutError("slow"), "transient"),
        (transient_error("slowdown"), "transient"),
        (client_error("InternalError", 500), "transient"),
        (client_error("ServiceUnavailable", 503), "transient"),
        (OSError(110, "Connection timed out"), "transient"),
        (ValueError("bad"), "permanent"),
        (client_error("InvalidRange", 416), "permanent"),
    ],
)
def test_classify_sorts_errors_into_missing_denied_transient_and_permanent(exc, kind):
    assert classify(exc) == kind


def test_transient_errors_are_retried_with_growing_delays():
    failures = [TimeoutError("t"), ConnectionResetError(104, "r"), transient_error("slowdown")]
    waits, stats = [], StoreStats()

    def flaky():
        if failures:
            raise failures.pop(0)
        return "done"

    policy = RetryPolicy(attempts=5, initial_delay=1.0, multiplier=2.0, jitter=0.0)
    assert with_retries(flaky, what="read", uri="s3://b/k", policy=policy, stats=stats, sleep=waits.append) == "done"
    assert waits == [1.0, 2.0, 4.0] and stats.retries == 3 and stats.failures == 0


def test_jitter_stays_within_its_fraction():
    policy = RetryPolicy(initial_delay=1.0, multiplier=3.0, max_delay=5.0, jitter=0.5)
    delays = [policy.delay(3) for _ in range(200)]  # 1 * 3**2 = 9, capped at 5
    assert all(2.5 <= d <= 5.0 for d in delays) and len(set(delays)) > 1


@pytest.mark.parametrize("exc, reason", [(FileNotFoundError("nope"), "not found"), (PermissionError("no"), "access denied")])
def test_missing_or_denied_is_not_retried(exc, reason):
    calls, stats = [], StoreStats()

    def fails():
        calls.append(1)
        raise exc

    with pytest.raises(StoreError) as info:
        with_retries(fails, what="read", uri="s3://bucket/key.tar", stats=stats, sleep=lambda s: None)
    assert len(calls) == 1 and stats.retries == 0 and stats.failures == 1
    assert info.value.uri == "s3://bucket/key.tar" and info.value.reason == reason
    assert str(info.value).startswith(f"s3://bucket/key.tar: {reason}")


def test_retries_give_up_after_the_policys_attempts():
    calls, stats = [], StoreStats()

    def always():
        calls.append(1)
        raise ConnectionResetError(104, "reset")

    with pytest.raises(StoreError, match="still failing after 3 attempts"):
        with_retries(always, what="read", uri="x", policy=RetryPolicy(attempts=3), stats=stats, sleep=lambda s: None)
    assert len(calls) == 3 and stats.retries == 2 and stats.failures == 1


def test_retrying_file_resumes_where_the_stream_broke(tmp_path):
    data = bytes(range(256)) * 400  # 100 KiB
    (tmp_path / "blob.bin").write_bytes(data)
    options = {"target_protocol": "file", "match": "blob", "fail_opens": 1, "fail_reads": 3, "run": "resume"}
    fs = fsspec.filesystem("flaky", **options)
    stats = StoreStats()
    with RetryingFile(fs, str(tmp_path / "blob.bin"), policy=RetryPolicy(initial_delay=0.0), stats=stats) as f:
        chunks = []
        while chunk := f.read(7000):
            chunks.append(chunk)
        assert f.tell() == len(data)
        assert f.seek(-10, 2) == len(data) - 10 and f.read() == data[-10:]
        f.seek(12345)
        assert f.read(5) == data[12345:12350]
    assert b"".join(chunks) == data  # no byte lost or repeated across three reconnections
    assert stats.retries == fs.injected == 4 and fs.calls["open"] == 5


def test_read_bytes_retries_then_names_the_uri(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    options = {"target_protocol": "file", "match": "a.png", "fail_opens": 2, "error": "timeout", "run": "cat"}
    fs = fsspec.filesystem("flaky", **options)
    stats = StoreStats()
    assert read_bytes(fs, str(tmp_path / "a.png"), policy=RetryPolicy(initial_delay=0.0), stats=stats) == b"png"
    assert stats.retries == 2
    with pytest.raises(StoreError, match="not found"):
        read_bytes(fs, str(tmp_path / "b.png"), uri="flaky://b.png", stats=stats)


def test_one_listing_per_prefix_and_a_failed_listing_is_retried(tmp_path):
    for rel in ("b/2.tar", "a/1.tar", "a/deep/3.TAR", "a/skip.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    options = {"target_protocol": "file", "fail_lists": 1, "run": "listing"}
    fs = fsspec.filesystem("flaky", **options)
    stats = StoreStats()
    _, root, keys = list_files(f"flaky://{tmp_path}", options, suffixes=(".tar",), policy=RetryPolicy(initial_delay=0.0), stats=stats)
    assert root == str(tmp_path) and keys == ["a/1.tar", "a/deep/3.TAR", "b/2.tar"]
    assert fs.calls == {"find": 2}  # one listing, tried twice: no per-object info/ls/open calls
    assert (stats.list_calls, stats.listed_keys, stats.retries) == (1, 4, 1)


def test_listing_on_s3_is_paged_list_calls_only(s3):
    bucket = s3.bucket("listing")
    for i in range(12):
        s3.fs.pipe(f"{bucket[5:]}/p/{i % 3}/{i:02d}.tar", b"x")
    requests = s3.requests()
    stats = StoreStats()
    _, _, keys = list_files(f"{bucket}/p/", s3.storage_options, stats=stats)
    assert keys == sorted(f"{i % 3}/{i:02d}.tar" for i in range(12))
    assert dict(requests) == {"ListObjectsV2": 1}
    assert stats.listed_keys == 12


def test_an_operation_that_fails_for_good_is_named_in_its_error_a_write_as_a_write():
    def refuse():
        raise ValueError("the bucket is read-only")

    for what in ("write", "read"):
        with pytest.raises(StoreError) as failed:
            with_retries(refuse, what=what, uri="s3://b/k")
        assert (
            failed.value.reason == f"{what} failed"
            and str(failed.value) == f"s3://b/k: {what} failed (ValueError: the bucket is read-only)"
        )
