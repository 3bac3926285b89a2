"""What several test files need: small images, tiny checkpoints, job configs, run-directory readers."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from PIL import Image

from models import build_model, save_native

# a SegFormer small enough to push hundreds of windows through on one CPU thread in seconds
TINY_SEGFORMER = dict(
    hidden_sizes=[8, 16, 32, 64],
    num_heads=[1, 1, 1, 1],
    depths=[1, 1, 1, 1],
    decoder_dim=16,
    strides=[8, 2, 2, 2],
    patch_sizes=[8, 3, 3, 3],
)
# every family small (reduced widths, one or two layers): a registered name -> (the name to build, its overrides)
_TINY_SWIN = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=7)
_TINY_QUERIES = dict(mask_dim=32, hidden_dim=32, num_queries=10, num_heads=2, ffn_dim=32)  # 32: GroupNorm(32)
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "segformer-b0": ("segformer-b0", TINY_SEGFORMER),
    "segformer-b2": ("segformer-b2", TINY_SEGFORMER),
    "maskformer-swin-tiny": ("maskformer-swin-tiny", dict(swin=_TINY_SWIN, fpn_dim=32, num_layers=1, **_TINY_QUERIES)),
    "mask2former-swin-tiny": (
        "mask2former-swin-tiny",
        dict(swin=_TINY_SWIN, feature_dim=32, encoder_layers=1, encoder_ffn_dim=32, num_layers=3, **_TINY_QUERIES),
    ),
    **{
        f"setr-{d}-vit-base": (f"setr-{d}-vit-tiny", dict(depth=4, channels=32, mla_neck_channels=32, mla_head_channels=16))
        for d in ("naive", "pup", "mla")
    },
    **{f"segmenter-{d}-vit-base": (f"segmenter-{d}-vit-tiny", dict(depth=2)) for d in ("linear", "mask")},
    "detr-resnet50-panoptic": (
        "detr-resnet50-panoptic",
        dict(
            stem_width=16,
            widths=[32, 64, 128, 256],
            depths=[1, 1, 1, 1],
            hidden_dim=32,  # + decoder_heads: a multiple of 8 (the mask head's GroupNorm)
            num_queries=10,
            encoder_layers=1,
            decoder_layers=1,
            encoder_heads=8,
            decoder_heads=8,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
        ),
    ),
}


def tiny_model(name: str, num_classes: int = 150, seed: int = 0):
    """The registered model `name` made small (TINY_MODELS), random weights from `seed`, in eval mode."""
    tiny_name, overrides = TINY_MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(tiny_name, num_classes=num_classes, **overrides).eval()


# the classes of the job tests' checkpoint (the `checkpoint` fixture of tests/conftest.py)
CLASS_NAMES = ["zero", "one", "two"]


def rel_error(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """max |a - b| / max |b|: one number for "equal up to float noise"."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def labeled_folder(root: Path, sizes: list[tuple[int, int]], num_classes: int, seed: int = 0, names: list[str] | None = None) -> Path:
    """root/images/<name>.png and root/labels/<name>.png: random pixels and labels."""
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        name = names[i] if names else f"img{i:03d}"
        write_png(root / "images" / f"{name}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        write_png(root / "labels" / f"{name}.png", rng.integers(0, num_classes, (h, w)).astype(np.uint8))
    return root


def tiny_checkpoint(path: Path, num_classes: int, seed: int = 0, class_names: list[str] | None = None, in_channels: int = 3) -> Path:
    """A native .safetensors of a tiny random SegFormer (of `in_channels` input channels); another seed gives other weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model("segformer-b0", num_classes=num_classes, in_channels=in_channels, **TINY_SEGFORMER)
    model.class_names = class_names
    path.parent.mkdir(parents=True, exist_ok=True)
    save_native(model, path)
    return path


# a tiny VisTR: ResNet-50's block counts with small widths, the real hidden width (384: the mask head's
# GroupNorm(8) of d/16 and the positions' thirds need it), one layer each, clips of 4 frames, 3 instances
TINY_VISTR = dict(stem_width=8, widths=[16, 32, 64, 128], ffn_dim=32, encoder_layers=1, decoder_layers=1, num_frames=4, num_instances=3)


def tiny_vistr_checkpoint(path: Path, num_classes: int = 3, seed: int = 0) -> Path:
    """A native .safetensors of a tiny random VisTR (TINY_VISTR), named vistr-r50. Seed 0: on noise
    frames its instances hold masks of about a third of the frame."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model("vistr-r50", num_classes=num_classes, **TINY_VISTR)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_native(model, path)
    return path


def job_config(tmp_path: Path, images: Path, checkpoint: Path, *, labels: Path | None = None, run_id: str = "t1", **sections) -> dict:
    """A small job: slide windows of 32, one actor, output under tmp_path/runs. Sections given as
    dicts update the defaults (input={"images_per_unit": 2}); other values replace them."""
    cfg = {
        "run_id": run_id,
        "input": {"uri": str(images), "pattern": "**/*", "images_per_unit": 64},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {"mode": "slide", "window": [32, 32], "stride": [24, 24], "batch_size": 8},
        "resources": {"actors": 1},
        "output": {"uri": str(tmp_path / "runs")},
    }
    if labels is not None:
        cfg["input"]["labels"] = {"uri": str(labels)}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_run_table(run: Path, kind: str):
    """All parquet files of one table of a run directory (masks, metrics, errors), or None."""
    files = sorted((run / kind).glob("*.parquet"))
    return pq.read_table([str(f) for f in files]) if files else None


def run_iou(
    run: Path | str, labels: Path, num_classes: int, storage_options: dict | None = None, label_name: Callable[[str], str] = str
) -> list[float | None]:
    """Per-class IoU of a run's committed masks (a run directory or URI) against their labels in the
    local folder `labels` (an image's label: labels / label_name(image id)), counted here in numpy with
    mmseg's convention (areas summed over images)."""
    from pipeline.results.runstore import RunStore, read_mask

    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for image_id in RunStore.at(str(run), storage_options).read_table("masks", ["image_id"]).column("image_id").to_pylist():
        pred, label = read_mask(str(run), image_id, storage_options=storage_options), np.asarray(Image.open(labels / label_name(image_id)))
        for c in range(num_classes):
            inter[c] += np.sum((pred == c) & (label == c))
            union[c] += np.sum((pred == c) | (label == c))
    return [float(i / u) if u else None for i, u in zip(inter, union)]


def strict_json_load(path: Path):
    """json.loads that refuses NaN and Infinity, as JavaScript's JSON.parse and jq do."""

    def refuse(constant: str):
        raise ValueError(f"{path.name}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path: to compare a directory byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def isnan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def image_bytes(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    """An array (or a Pillow image) encoded in memory, as a store or an archive member holds it."""
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]], gz: bool = False) -> bytes:
    """A tar archive (gzipped when `gz`) of (member name, bytes), in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def store_rows(fs, run: str, kind: str) -> list[dict]:
    """The rows of one table of a run directory (masks, metrics, errors) on any fsspec filesystem,
    part after part: `read_run_table` for a run that is not a local path."""
    rows: list[dict] = []
    for path in sorted(fs.glob(f"{run}/{kind}/*.parquet")):
        with fs.open(path, "rb") as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def sparse_tiff(path: Path, height: int, width: int, tile: int = 512) -> Path:
    """A tiled RGB TIFF whose header claims height x width but holds one tile: tifffile writes the
    others empty (byte count 0, read as zeros), so a 120000 x 120000 header is a file of 440 kB."""
    import tifffile

    count = math.ceil(height / tile) * math.ceil(width / tile)
    tiles = (np.zeros((tile, tile, 3), np.uint8) if i == 0 else None for i in range(count))
    tifffile.imwrite(path, tiles, shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression="zlib")
    return path


def tiled_tiff(path: Path, shape: tuple[int, int], tile: int, pixels, **kwargs) -> Path:
    """A tiled uint8 TIFF of `shape` (height, width) written tile by tile, never more than one tile in
    memory: pixels(y, x, height, width) gives each region. RGB with photometric="rgb", else one channel."""
    import tifffile

    height, width = shape

    def tiles():
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                region = pixels(y, x, min(tile, height - y), min(tile, width - x))
                padded = np.zeros((tile, tile, *region.shape[2:]), np.uint8)
                padded[: region.shape[0], : region.shape[1]] = region
                yield padded

    channels = (3,) if kwargs.get("photometric") == "rgb" else ()
    tifffile.imwrite(
        path,
        tiles(),
        shape=(height, width, *channels),
        dtype=np.uint8,
        tile=(tile, tile),
        compression="zlib",
        compressionargs={"level": 1},
        **kwargs,
    )
    return path


def segpipe_run(path: Path, cfg: dict, *args: str) -> int:
    """`segpipe run` of `cfg` written to the YAML file `path` (extra CLI arguments after it): the exit code."""
    from jobs.cli import main

    return main(["run", str(write_yaml(path, cfg)), *args])


# ---------------------------------------------------------------------------------------------
# Small random transformers checkpoints (save_pretrained), for the model and checkpoint tests
# ---------------------------------------------------------------------------------------------

# a SegFormer of four narrow one-block stages
TINY_HF_SEGFORMER = dict(
    hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 3, 4], decoder_hidden_size=16, num_labels=3
)


def tiny_swin_config(depths=(1, 2, 2, 1)):
    """A 32-wide Swin with windows of 4 and every stage out: the backbone of the tiny MaskFormer and
    Mask2Former below."""
    from transformers import SwinConfig

    return SwinConfig(
        embed_dim=32,
        depths=list(depths),
        num_heads=[1, 2, 4, 8],
        window_size=4,
        image_size=64,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )


def tiny_maskformer_config(num_labels: int = 7, swin_depths=(1, 2, 2, 1), **overrides):
    """A MaskFormerConfig 32 wide, with a 2-layer DETR decoder over 5 queries."""
    from transformers import MaskFormerConfig

    decoder = dict(
        model_type="detr", d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64, num_queries=5, encoder_layers=1
    )
    kwargs = dict(
        backbone_config=tiny_swin_config(swin_depths),
        decoder_config=decoder,
        fpn_feature_size=32,
        mask_feature_size=32,
        num_labels=num_labels,
    )
    return MaskFormerConfig(**{**kwargs, **overrides})


def tiny_mask2former_config(num_labels: int = 7, swin_depths=(1, 2, 2, 1), **overrides):
    """A Mask2FormerConfig 32 wide: 2 deformable encoder layers, decoder_layers=5 (4 built), 6 queries."""
    from transformers import Mask2FormerConfig

    kwargs = dict(
        backbone_config=tiny_swin_config(swin_depths),
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=64,
        encoder_layers=2,
        decoder_layers=5,
        num_attention_heads=4,
        dim_feedforward=64,
        num_queries=6,
        num_labels=num_labels,
    )
    return Mask2FormerConfig(**{**kwargs, **overrides})


def perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """`model` with every parameter (by `scale` x N(0, 1)) and every floating-point buffer moved off
    its initial value (ones, zeros), so that a swapped or dropped weight or frozen-norm term shows in
    a parity test; running variances drawn in [0.5, 1.5), positive."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
            elif buffer.is_floating_point():
                buffer.add_(0.1 * torch.randn(buffer.shape, generator=generator))
    return model


def saved_hf_model(model_class, config, path: Path, seed: int = 0, perturb: bool = True):
    """`model_class(config)` with random weights (seeded), written to `path` by save_pretrained and
    returned in eval mode. `perturb` moves every parameter off its initial value (ones, zeros), so
    that a swapped norm or bias shows in a parity test."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    if perturb:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path)
    return model


def tiny_hf_checkpoint(model_type: str, path: Path, seed: int = 0, perturb: bool = False):
    """A small checkpoint directory of config.json `model_type`, for each type segpipe loads (a
    KeyError for another: add it here); returns the transformers model."""
    import transformers

    models = {
        "segformer": lambda: (transformers.SegformerForSemanticSegmentation, transformers.SegformerConfig(**TINY_HF_SEGFORMER)),
        "maskformer": lambda: (transformers.MaskFormerForInstanceSegmentation, tiny_maskformer_config()),
        "mask2former": lambda: (transformers.Mask2FormerForUniversalSegmentation, tiny_mask2former_config()),
        "detr": lambda: (transformers.DetrForSegmentation, tiny_detr_config()),
    }
    model_class, config = models[model_type]()
    return saved_hf_model(model_class, config, path, seed=seed, perturb=perturb)


def pysodmetrics_reference(images: list[tuple[np.ndarray, np.ndarray]]) -> tuple[dict[str, float], dict[str, list]]:
    """PySODMetrics (the reference implementation) fed (8-bit prediction, 0-255 label) image by image:
    the camouflaged-object dataset values under segpipe's key names, and its per-image lists."""
    import warnings

    import py_sod_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Fmeasure: "will be removed in the future"
        fm = py_sod_metrics.Fmeasure()
    sm, em, wfm, mae = py_sod_metrics.Smeasure(), py_sod_metrics.Emeasure(), py_sod_metrics.WeightedFmeasure(), py_sod_metrics.MAE()
    for prediction, label in images:
        for metric in (sm, em, wfm, fm, mae):
            metric.step(pred=prediction, gt=label)
    e, f = em.get_results()["em"], fm.get_results()["fm"]
    dataset = {
        "Sm": sm.get_results()["sm"],
        "Em_mean": e["curve"].mean(),
        "Em_max": e["curve"].max(),
        "Em_adp": e["adp"],
        "wFm": wfm.get_results()["wfm"],
        "Fm_mean": f["curve"].mean(),
        "Fm_max": f["curve"].max(),
        "Fm_adp": f["adp"],
        "MAE": mae.get_results()["mae"],
    }
    per_image = {
        "sm": sm.sms,
        "wfm": wfm.weighted_fms,
        "mae": mae.maes,
        "em_adp": em.adaptive_ems,
        "fm_adp": fm.adaptive_fms,
        "em_curve": em.changeable_ems,
        "fm_curve": fm.changeable_fms,
    }
    return dataset, per_image


def scene_pixels(y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Pixels of the synthetic scene at any region: bands and checks that deflate well, no noise.
    Each channel is an outer sum (or xor) of a row and a column pattern, in uint8 (wrapping mod 256)."""
    ys, xs = np.arange(y0, y0 + height), np.arange(x0, x0 + width)
    out = np.empty((height, width, 3), np.uint8)
    np.add.outer((ys // 37 * 53 % 256).astype(np.uint8), (xs // 29 * 17 % 256).astype(np.uint8), out=out[..., 0])
    np.add.outer((ys // 11 * 3 % 256).astype(np.uint8), (xs // 13 % 256).astype(np.uint8), out=out[..., 1])
    np.bitwise_xor.outer((ys // 200 % 2 * 200).astype(np.uint8), (xs // 300 % 2 * 200).astype(np.uint8), out=out[..., 2])
    out[..., 2] += (xs % 50).astype(np.uint8)
    return out


def tiny_detr_config(num_labels: int = 6, **overrides):
    """A DetrConfig (transformers' ResNet, no timm) 32 wide: a bottleneck ResNet of widths 32..96 with
    every stage out (the mask head needs C2..C4), 2 + 2 layers, 8 encoder heads (the mask head's
    input, 32 + 8, must be a multiple of 8) and 4 decoder heads, 5 queries."""
    from transformers import DetrConfig, ResNetConfig

    backbone = ResNetConfig(
        embedding_size=16,
        hidden_sizes=[32, 48, 64, 96],
        depths=[1, 2, 1, 1],
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    kwargs = dict(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone_config=backbone,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=8,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=5,
        num_labels=num_labels,
    )
    return DetrConfig(**{**kwargs, **overrides})


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session `sid` (a run or a `ray start`, and all it started: its
    local Ray, their workers): what a lost machine does, and nothing else on the machine."""
    listing = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout.split()
    for pid, session in zip(listing[::2], listing[1::2]):
        if int(session) == sid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Geospatial rasters (the `geo` extra), written with rasterio
# ---------------------------------------------------------------------------------------------

UTM_33N = "EPSG:32633"
UTM_TRANSFORM = (10.0, 0.0, 500_000.0, 0.0, -10.0, 4_600_000.0)  # 10 m pixels


def write_raster(
    path: Path, data: np.ndarray, *, crs: str | None = UTM_33N, transform=UTM_TRANSFORM, nodata=None, tile: int | None = None
) -> Path:
    """data (bands x H x W) as a GeoTIFF: `crs` (None: none), affine `transform` (a, b, c, d, e, f), `nodata`."""
    import rasterio
    from affine import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype.name, nodata=nodata)
    if crs is not None:
        profile.update(crs=crs, transform=Affine(*transform))
    if tile:
        profile.update(tiled=True, blockxsize=tile, blockysize=tile)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def scene_12bit(height: int = 120, width: int = 160, border: int = 32, seed: int = 0) -> np.ndarray:
    """4 x H x W uint16 of a 12-bit sensor (0..4095): smooth fields, noise, and a border of 0 (no data)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    bands = []
    for b in range(4):
        field = 1500 + 1200 * np.sin(x / (23 + 7 * b)) * np.cos(y / (31 - 5 * b)) + rng.normal(0, 150, (height, width))
        bands.append(np.clip(field, 1, 4095))
    data = np.stack(bands).astype(np.uint16)
    data[:, :border] = 0
    data[:, :, -border:] = 0
    return data


def write_video(
    path: Path,
    frames: list[np.ndarray],
    fps: int = 10,
    codec: str | None = None,
    gop: int | None = None,
    stamps_ms: list[int] | None = None,
    rotation: int = 0,
) -> Path:
    """A video of `frames` (H x W x 3 uint8 RGB) at `fps`, written by PyAV: lossless FFV1 for .mkv
    (frames read back equal), else `codec` (default mpeg4). `gop`: frames between keyframes.
    `stamps_ms`: each frame's presentation time in ms (a variable-rate recording; the stream still
    declared at `fps`). `rotation`: a display matrix turning the frames that many degrees
    counter-clockwise for display (a phone's portrait video, stored sideways)."""
    from fractions import Fraction

    import av

    codec = codec or ("ffv1" if path.suffix == ".mkv" else "mpeg4")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"  # ffv1 keeps RGB exactly
        if gop:
            stream.codec_context.gop_size = gop
        if rotation:
            stream.set_display_rotation(rotation)
        if stamps_ms is not None:  # the encoder keeps each frame's own time
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for k, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if stamps_ms is not None:
                frame.pts, frame.time_base = stamps_ms[k], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# 0.5-degree pixels from 62N southwards: each row's pixels are ~2% larger than the row above
LONLAT_TRANSFORM = (0.5, 0.0, 10.0, 0.0, -0.5, 62.0)


def pixel_area_by_geod(transform, row: int, col: int) -> float:
    """One pixel's area on WGS84, computed directly: its four corners as a polygon (pyproj.Geod)."""
    a, b, c, d, e, f = transform
    corners = [(col, row), (col + 1, row), (col + 1, row + 1), (col, row + 1)]
    from pyproj import Geod

    area, _ = Geod(ellps="WGS84").polygon_area_perimeter([a * x + b * y + c for x, y in corners], [d * x + e * y + f for x, y in corners])
    return abs(area)


def written_run(
    out_root: Path,
    run_id: str,
    parts: list[dict[str, tuple]],
    num_classes: int,
    names: list[str],
    *,
    data_root: Path | None = None,
    metrics: dict | None = None,
) -> tuple[str, dict]:
    """A run directory as the predictor and the writer leave it, without Ray: `parts` (one committed
    part each, in attempt order) map image_id -> (mask, label or None); each labeled image's areas
    (and a binary task's camouflaged-object stats) counted as the predictor counts them, run.json with
    the config fields `compare` reads (`data_root`: the images and labels folders, see
    `labeled_photos`), summary.json from the parts. Returns (its path, its summary)."""
    from pipeline.metrics.cod import cod_image_stats
    from pipeline.metrics.semantic import LabelAreas, LabelReading
    from pipeline.results.masks import encode_chunks
    from pipeline.results.run_tables import METRICS, part_name
    from pipeline.results.runstore import RunStore, summary_of
    from pipeline.results.sink import part_tables
    from pipeline.rows import Prediction

    metrics = {"task": "semantic", "binary_labels": "auto", "ignore_index": None, "positive_class": 1, "reduce_zero_label": False} | (
        metrics or {}
    )
    binary = metrics["task"] == "binary"
    reading = LabelReading.of(
        metrics["task"],
        metrics["binary_labels"],
        metrics["ignore_index"],
        metrics["positive_class"],
        num_classes,
        metrics["reduce_zero_label"],
    )
    store = RunStore(str(out_root), {}, run_id)
    for attempt, part in enumerate(parts, start=1):
        rows = []
        for image_id, (mask, label) in part.items():
            probability = (mask == metrics["positive_class"]).astype(np.float32) * 0.8 + 0.1 if binary else None
            row = Prediction(0, image_id, *mask.shape, encode_chunks(mask, probability, None, num_classes))
            if label is not None:
                areas = LabelAreas(reading)
                areas.add(mask, label)
                row.areas = areas.finish()
                if binary:
                    foreground = reading.foreground(label, "class_index" if row.areas.reading == "empty" else row.areas.reading)
                    quantized = np.rint(probability * 255).astype(np.uint8)
                    row.cod = cod_image_stats(quantized, foreground.astype(np.uint8) * 255).to_flat()
            rows.append(row)
        store.write_part(part_name(attempt, 0, 0), *part_tables(rows, binary=binary, attempt=attempt, cod=binary))
    config = {"run_id": run_id, "metrics": metrics}
    if data_root is not None:
        config["input"] = {"uri": str(data_root / "images"), "format": "images", "labels": {"uri": str(data_root / "labels")}}
    model = {"name": "tiny", "num_classes": num_classes, "mask_classes": num_classes, "class_names": list(names)}
    store.write_json("run.json", {"run_id": run_id, "status": "succeeded", "config": config, "model": model})
    summary = summary_of([store.read_part(METRICS, p) for p in store.parts_of(METRICS)], store.outcomes(), num_classes, list(names))
    summary["throughput"] = {"images_per_second": 1.0, "seconds": 1.0, "startup": "actors"}
    store.write_json("summary.json", summary)
    return str(out_root / run_id), summary


def labeled_photos(root: Path, labels: dict[str, np.ndarray]) -> Path:
    """root/images/<id> (black photos) and root/labels/<id stem>.png: the folders a written_run reads."""
    for image_id, label in labels.items():
        write_png(root / "images" / image_id, np.zeros((*label.shape, 3), np.uint8))
        write_png(root / "labels" / (image_id.rsplit(".", 1)[0] + ".png"), label)
    return root


def mmseg_reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmsegmentation's LoadAnnotations with reduce_zero_label, its three lines as written there."""
    gt_semantic_seg = label.copy()
    gt_semantic_seg[gt_semantic_seg == 0] = 255
    gt_semantic_seg = gt_semantic_seg - 1
    gt_semantic_seg[gt_semantic_seg == 254] = 255
    return gt_semantic_seg
