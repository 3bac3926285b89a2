"""pipeline.metrics.cod: camouflaged-object metrics, per image and streamed, against PySODMetrics."""

from __future__ import annotations

import io
import pickle
import warnings

import numpy as np
import py_sod_metrics
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import pysodmetrics_reference
from scipy.ndimage import gaussian_filter

from pipeline.metrics.cod import CONVENTIONS, KEYS, CodAccumulator, CodImageStats, cod_image_stats


def _smooth(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal(shape), sigma)
    return field / field.std()


def _probability_u8(rng, shape, sigma=4.0, scale=2.0, offset=0.0) -> np.ndarray:
    """A smooth probability map as segpipe stores it: round(255 p)."""
    p = 1 / (1 + np.exp(-(scale * _smooth(rng, shape, sigma) + offset)))
    return np.round(255 * p).astype(np.uint8)


def _blob_label(rng, shape, sigma=6.0, level=0.8) -> np.ndarray:
    """Blobs on 0-255 with soft edges (values around 128 test the > 128 binarisation)."""
    field = _smooth(rng, shape, sigma)
    soft = 1 / (1 + np.exp(-4 * (field - level)))
    return np.round(255 * soft).astype(np.uint8)


def _prediction_for(rng, label: np.ndarray, noise=1.0) -> np.ndarray:
    """A smooth probability map that roughly finds the label's blobs (a plausible model's output)."""
    logit = 3 * gaussian_filter((label > 128) * 2.0 - 1, 2.0) + noise * _smooth(rng, label.shape, 3.0)
    return np.round(255 / (1 + np.exp(-logit))).astype(np.uint8)


def _images() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    images = []
    for shape in [(37, 53), (64, 64), (120, 90), (201, 157)]:
        label = _blob_label(rng, shape)
        images.append((_prediction_for(rng, label), label))
    images.append((_probability_u8(rng, (50, 40)), _blob_label(rng, (50, 40))))  # unrelated to its label
    shape = (48, 72)
    images.append((_probability_u8(rng, shape, offset=-2.0), np.zeros(shape, np.uint8)))  # all background
    images.append((_probability_u8(rng, shape, offset=2.0), np.full(shape, 255, np.uint8)))  # all foreground
    narrow = (100 + _probability_u8(rng, (80, 60)) // 6).astype(np.uint8)  # levels 100..142: min-max stretches them
    images.append((narrow, _blob_label(rng, (80, 60))))
    images.append((np.full((40, 50), 200, np.uint8), _blob_label(rng, (40, 50))))  # constant map: stays p / 255
    images.append((np.zeros((30, 30), np.uint8), _blob_label(rng, (30, 30), level=0.3)))
    binary = np.where(_blob_label(rng, (70, 70)) > 128, 255, 0).astype(np.uint8)
    images.append((binary, _blob_label(rng, (70, 70))))  # a thresholded prediction: two levels
    for prediction, label in images:
        assert prediction.shape == label.shape
    return images


def test_dataset_values_equal_pysodmetrics_on_every_key_image_by_image():
    images = _images()
    reference, _ = pysodmetrics_reference(images)
    acc = CodAccumulator()
    for prediction, label in images:
        acc.add(cod_image_stats(prediction, label))
    result = acc.result()
    assert tuple(result) == KEYS
    assert acc.images == len(images)
    for key in KEYS:
        assert np.isfinite(result[key]), key
        assert result[key] == pytest.approx(float(reference[key]), abs=1e-6), key


def test_each_images_values_and_curves_equal_pysodmetrics_including_empty_and_full_labels():
    images = _images()
    _, reference = pysodmetrics_reference(images)
    for i, (prediction, label) in enumerate(images):
        stats = cod_image_stats(prediction, label)
        for name in CodImageStats.SCALARS:
            assert getattr(stats, name) == pytest.approx(float(reference[name][i]), abs=1e-9), (i, name)
        for name in CodImageStats.CURVES:
            np.testing.assert_allclose(getattr(stats, name), reference[name][i], rtol=0, atol=1e-9, err_msg=f"{i} {name}")


def test_accumulators_of_disjoint_images_merge_into_the_whole_sets_values():
    images = _images()
    whole, first, second = CodAccumulator(), CodAccumulator(), CodAccumulator()
    for i, (prediction, label) in enumerate(images):
        stats = cod_image_stats(prediction, label)
        whole.add(stats)
        (first if i % 2 else second).add(stats)
    first.merge(second)
    assert first.images == whole.images
    for key, value in whole.result().items():
        assert first.result()[key] == pytest.approx(value, abs=1e-12)


def test_image_record_round_trips_through_plain_values_pickle_and_parquet():
    prediction, label = _images()[0]
    stats = cod_image_stats(prediction, label)
    record = stats.to_record()
    assert all(type(record[name]) is float for name in CodImageStats.SCALARS)
    assert all(type(record[name]) is list and len(record[name]) == 256 for name in CodImageStats.CURVES)
    assert all(type(v) is float for name in CodImageStats.CURVES for v in record[name])

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([record]), buffer)
    from_parquet = pq.read_table(io.BytesIO(buffer.getvalue())).to_pylist()[0]
    from_pandas = pq.read_table(io.BytesIO(buffer.getvalue())).to_pandas().iloc[0].to_dict()  # curves as arrays
    for back in (record, pickle.loads(pickle.dumps(record)), from_parquet, from_pandas):
        restored = CodImageStats.from_record(back)
        assert restored.to_record() == record
        for name in CodImageStats.CURVES:
            assert np.array_equal(getattr(restored, name), getattr(stats, name))


def test_stats_have_the_same_size_for_a_small_and_a_large_image_and_the_accumulator_does_not_grow():
    rng = np.random.default_rng(1)
    small = cod_image_stats(_probability_u8(rng, (64, 64)), _blob_label(rng, (64, 64)))
    large = cod_image_stats(_probability_u8(rng, (512, 512)), _blob_label(rng, (512, 512)))
    assert len(pickle.dumps(small.to_record())) == len(pickle.dumps(large.to_record()))
    assert pa.Table.from_pylist([small.to_record()]).nbytes == pa.Table.from_pylist([large.to_record()]).nbytes
    for name in CodImageStats.CURVES:
        assert getattr(small, name).nbytes == getattr(large, name).nbytes == 256 * 8

    acc = CodAccumulator()
    acc.add(small)
    one = len(pickle.dumps(acc))
    for _ in range(50):
        acc.add(large)
    assert len(pickle.dumps(acc)) == one


def test_foreground_centroid_on_the_last_row_gives_nan_s_measure_as_pysodmetrics_does():
    prediction = _probability_u8(np.random.default_rng(2), (20, 30))
    label = np.zeros((20, 30), np.uint8)
    label[-1, 5:9] = 255  # the centroid rounds to the last row: the lower quadrants are empty
    stats = cod_image_stats(prediction, label)
    reference = py_sod_metrics.Smeasure()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # PySODMetrics takes the mean of an empty slice
        reference.step(pred=prediction, gt=label)
    assert np.isnan(reference.sms[0]) and np.isnan(stats.sm)


def test_wrong_inputs_are_refused_with_the_reason():
    u8 = np.zeros((4, 5), np.uint8)
    with pytest.raises(TypeError, match="prediction must be a uint8"):
        cod_image_stats(u8.astype(np.float32), u8)
    with pytest.raises(TypeError, match="label must be a uint8"):
        cod_image_stats(u8, u8.astype(np.int64))  # a class map must be put on 0-255 first
    with pytest.raises(ValueError, match="differ in size"):
        cod_image_stats(u8, np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match="expected"):
        CodImageStats.from_record({**cod_image_stats(u8, u8).to_record(), "em_curve": [0.0] * 255})


def test_an_empty_accumulator_gives_nan_for_every_key_and_conventions_name_every_key():
    assert all(np.isnan(v) for v in CodAccumulator().result().values())
    assert set(KEYS) <= set(CONVENTIONS)
