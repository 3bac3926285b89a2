"""Where images come from: the driver lists units (keys, never bytes); read tasks fetch their bytes.

A unit is one read task's worth of input: a block of image files (with their labels), a tar shard or
a Parquet file. Its `index` is its position in this attempt's listing; output parts are named by
attempt and unit (pipeline.runstore), so a changed listing never touches an earlier attempt's parts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Iterator

from pipeline.config import InputConfig
from pipeline.storage import StoreStats, full_uri, list_files, open_fs, read_bytes, scrub

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


@dataclass(frozen=True)
class SourceUnit:
    index: int
    format: str  # "images" | "tar" | "parquet"
    uris: tuple[str, ...]
    label_uris: tuple[str | None, ...] = ()
    image_ids: tuple[str, ...] = ()  # for "images": the id of each uri (its path relative to input.uri)


@dataclass
class RawSample:
    """One image's bytes as read, before decoding."""

    unit: int
    index_in_unit: int
    image_id: str
    image_bytes: bytes | None
    label_bytes: bytes | None
    error: str | None = None  # a read failure: becomes an errors row, the job goes on
    has_label: bool = False  # a label was expected for this image (it may still have failed to read)
    stream: Any = None  # a pipeline.huge.StreamSource: a TIFF too large to decode whole, read by windows later


def glob_regex(pattern: str) -> re.Pattern:
    """A regex for a relative path glob: `**/` matches any number of directories (zero included)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _strip_ext(key: str) -> str:
    p = PurePosixPath(key)
    return str(p.with_suffix("")) if p.suffix else key


def list_image_units(cfg: InputConfig, stats: StoreStats | None = None) -> list[SourceUnit]:
    """Image files under input.uri matching `pattern`, with their labels, in blocks of images_per_unit.

    One recursive listing of the images prefix and one of the labels prefix, never a call per key.
    """
    regex = glob_regex(cfg.pattern)
    fs, root, keys = list_files(cfg.uri, cfg.storage_options, suffixes=IMAGE_EXTENSIONS, stats=stats)
    if not keys and not fs.exists(root):
        raise FileNotFoundError(f"{cfg.uri} does not exist (input.uri)")
    keys = [k for k in keys if regex.match(k)]
    labels: dict[str, str] = {}
    if cfg.labels is not None:
        ranks = {ext: i for i, ext in enumerate(cfg.labels.extensions)}
        lfs, lroot, label_keys = list_files(cfg.labels.uri, cfg.storage_options, suffixes=tuple(ranks), stats=stats)
        if not label_keys and not lfs.exists(lroot):
            raise FileNotFoundError(f"labels {cfg.labels.uri} do not exist (input.labels.uri)")
        best: dict[str, tuple[int, str]] = {}
        for key in label_keys:
            rank = ranks[PurePosixPath(key).suffix.lower()]
            stem = _strip_ext(key)
            if stem not in best or rank < best[stem][0]:
                best[stem] = (rank, key)
        labels = {stem: full_uri(lfs, lroot + "/" + key) for stem, (_, key) in best.items()}
    units = []
    step = cfg.images_per_unit
    for index, start in enumerate(range(0, len(keys), step)):
        block = keys[start : start + step]
        units.append(
            SourceUnit(
                index=index,
                format="images",
                uris=tuple(full_uri(fs, root + "/" + k) for k in block),
                label_uris=tuple(labels.get(_strip_ext(k)) for k in block) if cfg.labels else (),
                image_ids=tuple(block),
            )
        )
    return units


def read_image_unit(unit: SourceUnit, cfg: InputConfig, stats: StoreStats | None = None) -> Iterator[RawSample]:
    """The bytes of each image (and label) of a unit; a read failure is an error sample."""
    from pipeline.huge import probe_stream  # huge builds on this module's types
    fs, _ = open_fs(cfg.uri, cfg.storage_options)
    lfs = open_fs(cfg.labels.uri, cfg.storage_options)[0] if cfg.labels else None
    for i, (uri, image_id) in enumerate(zip(unit.uris, unit.image_ids)):
        label_uri = unit.label_uris[i] if unit.label_uris else None
        sample = RawSample(unit.index, i, image_id, None, None, has_label=label_uri is not None)
        try:
            # a huge tiled/striped TIFF is not read here: the predictor reads it window by window
            sample.stream = probe_stream(uri, label_uri, cfg, stats)
            if sample.stream is not None:
                yield sample
                continue
            sample.image_bytes = read_bytes(fs, uri, stats=stats)
            if label_uri is not None:
                sample.label_bytes = read_bytes(lfs, label_uri, stats=stats)
            elif cfg.labels is not None and cfg.labels.required:
                sample.error = f"no label for {image_id} under {cfg.labels.uri}"
        except Exception as exc:  # one unreadable object is one errors row
            sample.error = scrub(f"read: {exc}", cfg.storage_options)
        yield sample


def list_units(cfg: InputConfig, stats: StoreStats | None = None) -> list[SourceUnit]:
    """The driver's listing: units of keys, by input format."""
    from pipeline import shards  # shards builds on this module's types
    fmt = resolve_format(cfg)
    if fmt == "tar":
        return shards.list_tar_units(cfg.uri, cfg.storage_options, stats=stats)
    if fmt == "parquet":
        return shards.list_parquet_units(cfg.uri, cfg.storage_options, stats=stats)
    return list_image_units(cfg, stats)


def read_unit(unit: SourceUnit, cfg: InputConfig, stats: StoreStats | None = None) -> Iterator[RawSample]:
    """A read task's samples: image files, a tar shard's samples, or a Parquet file's rows."""
    from pipeline import shards
    required = cfg.labels is not None and cfg.labels.required
    if unit.format == "tar":
        suffix = cfg.labels.suffix if cfg.labels else shards.DEFAULT_LABEL_SUFFIX
        return shards.read_tar_unit(unit, cfg.storage_options, label_suffix=suffix, labels_required=required, stats=stats)
    if unit.format == "parquet":
        return shards.read_parquet_unit(
            unit, cfg.storage_options, image_column=cfg.image_column, id_column=cfg.id_column,
            label_column=cfg.label_column, labels_required=required, stats=stats,
        )
    return read_image_unit(unit, cfg, stats)


def resolve_format(cfg: InputConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    uri = cfg.uri.rstrip("/").lower()
    if uri.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if uri.endswith(".parquet"):
        return "parquet"
    return "images"
