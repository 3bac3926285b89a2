"""Test-time augmentation (pipeline.tiling.TTAScoreFn, config inference.tta): flips and scales
averaged in score space, in whole and slide mode, and through `segpipe run`."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from jobs.cli import main
from models import build_model, load_model, save_native
from pipeline.predictor import ModelScorer
from pipeline.masks import read_mask
from pipeline.tiling import TilingSettings, TTAScoreFn, segment_images, segment_streaming, with_tta


def pointwise_score_fn(num_classes: int = 3, seed: int = 0):
    """A 1 x 1 conv: every pixel scored alone, so the model commutes with flips exactly, and with
    bilinear resizing too (an affine map of the pixel values)."""
    conv = torch.nn.Conv2d(3, num_classes, 1)
    torch.manual_seed(seed)
    torch.nn.init.normal_(conv.weight, std=0.05)
    torch.nn.init.normal_(conv.bias, std=1.0)

    def score_fn(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return conv(pixels / 255.0)

    return score_fn


def blocks_image(height: int, width: int, block: int, seed: int = 0) -> np.ndarray:
    """Constant-colour blocks: bilinear resizing changes nothing inside a block."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (height // block + 1, width // block + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(colours, block, 0), block, 1)[:height, :width])


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_flip_of_a_flip_equivariant_model_changes_nothing(mode):
    image = np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    score_fn = pointwise_score_fn(2)
    settings = TilingSettings(mode=mode, window=(32, 32), stride=(20, 20), blend="gaussian", binary=True)
    plain = segment_images(score_fn, [image], settings)[0]
    flipped = segment_images(TTAScoreFn(score_fn, flip=True), [image], settings)[0]
    np.testing.assert_array_equal(flipped.labels, plain.labels)
    np.testing.assert_allclose(flipped.probability, plain.probability, atol=1e-6)


def test_flipped_view_is_mirrored_back_before_averaging():
    """A model that ignores its input and scores by column: with flip, the two views' ramps run in
    opposite directions once mirrored back, so their mean is flat. Without the mirror it would
    still be the ramp."""
    def column_ramp(pixels: torch.Tensor) -> torch.Tensor:
        n, _, h, w = pixels.shape
        ramp = torch.arange(w, dtype=torch.float32).expand(n, 1, h, w)
        return torch.cat([torch.zeros_like(ramp), ramp], dim=1)

    scores = TTAScoreFn(column_ramp, flip=True)(torch.zeros(2, 3, 5, 8))
    torch.testing.assert_close(scores[:, 1], torch.full((2, 5, 8), 3.5))
    torch.testing.assert_close(scores[:, 0], torch.zeros(2, 5, 8))


def test_scales_run_each_view_at_its_size_and_average_them():
    """Scores that report the height each view was run at: scales 0.5, 1 and 2 of a 32-row window
    average to (16 + 32 + 64) / 3, at the output size of the largest view (a quarter of 64 x 96)."""
    def height_at_stride_4(pixels: torch.Tensor) -> torch.Tensor:
        n, _, h, w = pixels.shape
        return torch.full((n, 2, (h + 3) // 4, (w + 3) // 4), float(h))

    scores = TTAScoreFn(height_at_stride_4, scales=[0.5, 1.0, 2.0])(torch.zeros(3, 3, 32, 48))
    assert scores.shape == (3, 2, 16, 24)
    torch.testing.assert_close(scores, torch.full((3, 2, 16, 24), 112 / 3))
    # with flip too, each scale counts twice and the mean is the same
    torch.testing.assert_close(TTAScoreFn(height_at_stride_4, flip=True, scales=[0.5, 1.0, 2.0])(torch.zeros(1, 3, 32, 48)), torch.full((1, 2, 16, 24), 112 / 3))
    # the output never exceeds the window: a model at full resolution with an upscaled view
    full = TTAScoreFn(lambda x: torch.zeros(x.shape[0], 2, *x.shape[-2:]), scales=[1.5, 1.0])(torch.zeros(1, 3, 20, 30))
    assert full.shape == (1, 2, 20, 30)


def test_scales_change_nothing_for_a_scale_invariant_model_inside_blocks():
    image = blocks_image(96, 128, block=16)
    score_fn = pointwise_score_fn(3)
    settings = TilingSettings(window=(64, 64), stride=(32, 32))
    plain = segment_images(score_fn, [image], settings)[0].labels
    tta = TTAScoreFn(score_fn, flip=True, scales=[0.75, 1.0, 1.5])
    multi = segment_images(tta, [image], settings)[0].labels
    # resampling only blurs the blocks' edges: 3 pixels in from every edge the labels are the same
    inside = np.zeros(image.shape[:2], bool)
    for y in range(0, 96, 16):
        for x in range(0, 128, 16):
            inside[y + 3 : y + 13, x + 3 : x + 13] = True
    np.testing.assert_array_equal(multi[inside], plain[inside])
    assert (multi == plain).mean() > 0.9


def test_streamed_and_in_memory_images_get_the_same_tta():
    image = np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    tta = TTAScoreFn(pointwise_score_fn(3, seed=3), flip=True, scales=[1.0, 0.5])
    settings = TilingSettings(window=(32, 32), stride=(24, 24), blend="gaussian")
    expected = segment_images(tta, [image], settings)[0].labels
    streamed = np.concatenate([labels for _, labels, _ in segment_streaming(
        tta, lambda y, x, h, w: image[y : y + h, x : x + w], 70, 90, settings)])
    np.testing.assert_array_equal(streamed, expected)


def test_with_tta_is_the_plain_score_fn_when_there_is_nothing_to_augment():
    score_fn = pointwise_score_fn()
    assert with_tta(score_fn, flip=False, scales=[1.0]) is score_fn
    assert isinstance(with_tta(score_fn, flip=False, scales=[1.0, 1.25]), TTAScoreFn)
    with pytest.raises(ValueError, match="positive"):
        TTAScoreFn(score_fn, scales=[1.0, 0.0])


def test_tta_through_segpipe_run(ray_session, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    arrays = {f"img{i}.png": rng.integers(0, 256, size, dtype=np.uint8) for i, size in enumerate([(60, 90, 3), (41, 33, 3)])}
    for name, array in arrays.items():
        Image.fromarray(array).save(images / name)
    torch.manual_seed(0)
    model = build_model("segformer-b0", num_classes=3, hidden_sizes=[8, 16, 32, 64], num_heads=[1, 1, 1, 1], depths=[1, 1, 1, 1], decoder_dim=16)
    checkpoint = tmp_path / "tiny.safetensors"
    save_native(model, checkpoint)
    tta = {"flip": True, "scales": [1.0, 1.5]}
    config = {
        "run_id": "tta",
        "input": {"uri": str(images)},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {"mode": "slide", "window": [48, 48], "stride": [32, 32], "batch_size": 4, "tta": tta},
        "resources": {"actors": 1},
        "output": {"uri": str(tmp_path / "runs")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    run = tmp_path / "runs" / "tta"
    assert pq.read_table(str(run / "masks")).num_rows == 2

    scorer = ModelScorer(load_model(str(checkpoint)).eval(), torch.device("cpu"))
    settings = TilingSettings(window=(48, 48), stride=(32, 32), batch_size=4)
    with_aug = segment_images(TTAScoreFn(scorer, **tta), list(arrays.values()), settings)
    without = segment_images(scorer, list(arrays.values()), settings)
    changed = 0
    for (name, _), expected, plain in zip(arrays.items(), with_aug, without):
        written = read_mask(str(run), name)
        assert (written == expected.labels).mean() >= 0.999
        changed += int((written != plain.labels).sum())
    assert changed > 0  # the run used the augmented views: without them some labels differ

    # a bad TTA config is a usage error that names the field
    capsys.readouterr()
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "inference": {"tta": {"scales": [1.0, -2]}}}))
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "inference.tta.scales" in capsys.readouterr().err
