"""What the tests share as fixtures: one local Ray and one S3 endpoint for the whole session, and
the small checkpoint every job test segments with. Plain functions are in tests/helpers.py; the
check that no process outlives the session is tests/process_check.py."""

from __future__ import annotations

import os

# before Ray is imported anywhere: no progress bars, and a stalled plan fails instead of hanging
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "120")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest
from process_check import pytest_sessionfinish  # noqa: F401  (the check that no process outlives the session)
from s3_server import S3Server, s3_endpoint  # importing it registers flaky://


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3() -> S3Server:
    """An S3 endpoint on 127.0.0.1 (moto) for the session: `s3.storage_options` point s3fs at it,
    `s3.bucket(stem)` makes a fresh bucket, `s3.requests()` counts the calls made from then on,
    `s3.received()` the bytes GetObject calls returned and the keys listings returned."""
    with s3_endpoint() as server:
        yield server


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A native .safetensors of a tiny random SegFormer (helpers.TINY_SEGFORMER) with the 3 classes of
    helpers.CLASS_NAMES: the model of the job tests, built once. Seed 2: its labels mix all three
    classes on noise images (seed 0 labels them all one class, which would hide a wrong mask)."""
    from helpers import CLASS_NAMES, tiny_checkpoint  # here: helpers imports torch and models

    path = tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors"
    return tiny_checkpoint(path, len(CLASS_NAMES), seed=2, class_names=CLASS_NAMES)


@pytest.fixture(scope="session")
def seed0_checkpoint(tmp_path_factory):
    """A native .safetensors of the same tiny SegFormer with seed 0 and 3 unnamed classes: the model of
    the rerun and incremental tests. On noise images it predicts no pixel of class 1, so that a run
    whose labels hold class 0 only has classes absent from labels and predictions alike (a null IoU)."""
    from helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("seed0") / "tiny.safetensors", 3, seed=0)
