"""Where images come from: the driver lists units (keys, never bytes); read tasks fetch their bytes.

A unit is one read task's worth of input: a block of image files (with their labels), a tar shard or
a Parquet file. Its `index` is its position in the listing, and output parts are named from it, so
a rerun of the same listing writes the same file names.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Iterator

import fsspec

from pipeline.config import InputConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


@dataclass(frozen=True)
class SourceUnit:
    index: int
    format: str  # "images" | "tar" | "parquet"
    uris: tuple[str, ...]
    label_uris: tuple[str | None, ...] = ()
    image_ids: tuple[str, ...] = ()  # for "images": the id of each uri (its path relative to input.uri)
    positions: tuple[int, ...] = ()  # original positions of the uris when a resumed run dropped some


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


def open_fs(uri: str, storage_options: dict) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(uri, **storage_options)
    return fs, root.rstrip("/")


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


def list_relative(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every file under root as a path relative to it: one recursive listing, no per-object calls."""
    if not fs.exists(root):
        raise FileNotFoundError(f"input {root} does not exist")
    prefix = root + "/"
    keys = []
    for path in fs.find(root):
        path = path.rstrip("/")
        if path.startswith(prefix):
            keys.append(path[len(prefix):])
        elif path.lstrip("/").startswith(prefix.lstrip("/")):
            keys.append(path.lstrip("/")[len(prefix.lstrip("/")):])
    return sorted(keys)


def _strip_ext(key: str) -> str:
    p = PurePosixPath(key)
    return str(p.with_suffix("")) if p.suffix else key


def list_image_units(cfg: InputConfig) -> list[SourceUnit]:
    """Image files under input.uri matching `pattern`, with their labels, in blocks of images_per_unit."""
    fs, root = open_fs(cfg.uri, cfg.storage_options)
    regex = glob_regex(cfg.pattern)
    keys = [k for k in list_relative(fs, root) if regex.match(k) and k.lower().endswith(IMAGE_EXTENSIONS)]
    labels: dict[str, str] = {}
    if cfg.labels is not None:
        lfs, lroot = open_fs(cfg.labels.uri, cfg.storage_options)
        ranks = {ext: i for i, ext in enumerate(cfg.labels.extensions)}
        best: dict[str, tuple[int, str]] = {}
        for key in list_relative(lfs, lroot):
            ext = PurePosixPath(key).suffix.lower()
            if ext in ranks:
                stem = _strip_ext(key)
                if stem not in best or ranks[ext] < best[stem][0]:
                    best[stem] = (ranks[ext], key)
        protocol = _protocol_prefix(cfg.labels.uri)
        labels = {stem: protocol + lroot + "/" + key for stem, (_, key) in best.items()}
    protocol = _protocol_prefix(cfg.uri)
    units = []
    step = cfg.images_per_unit
    for index, start in enumerate(range(0, len(keys), step)):
        block = keys[start : start + step]
        units.append(
            SourceUnit(
                index=index,
                format="images",
                uris=tuple(protocol + root + "/" + k for k in block),
                label_uris=tuple(labels.get(_strip_ext(k)) for k in block) if cfg.labels else (),
                image_ids=tuple(block),
            )
        )
    return units


def _protocol_prefix(uri: str) -> str:
    """'s3://b/x' -> 's3://', a local path -> '' (fsspec's root paths drop the protocol)."""
    return uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""


def read_image_unit(unit: SourceUnit, cfg: InputConfig) -> Iterator[RawSample]:
    """The bytes of each image (and label) of a unit; a read failure is an error sample."""
    fs, _ = open_fs(cfg.uri, cfg.storage_options)
    lfs = open_fs(cfg.labels.uri, cfg.storage_options)[0] if cfg.labels else None
    for i, (uri, image_id) in enumerate(zip(unit.uris, unit.image_ids)):
        label_uri = unit.label_uris[i] if unit.label_uris else None
        sample = RawSample(unit.index, i, image_id, None, None, has_label=label_uri is not None)
        try:
            sample.image_bytes = fs.cat_file(uri)
        except Exception as exc:  # one unreadable object is one errors row
            sample.error = f"read {uri}: {type(exc).__name__}: {exc}"
            yield sample
            continue
        if label_uri is not None:
            try:
                sample.label_bytes = lfs.cat_file(label_uri)
            except Exception as exc:
                sample.error = f"read label {label_uri}: {type(exc).__name__}: {exc}"
        elif cfg.labels is not None and cfg.labels.required:
            sample.error = f"no label for {image_id} under {cfg.labels.uri}"
        yield sample


def list_units(cfg: InputConfig) -> list[SourceUnit]:
    fmt = resolve_format(cfg)
    if fmt == "images":
        return list_image_units(cfg)
    raise NotImplementedError(f"input.format {fmt!r} is not wired in yet")


def read_unit(unit: SourceUnit, cfg: InputConfig) -> Iterator[RawSample]:
    if unit.format == "images":
        return read_image_unit(unit, cfg)
    raise NotImplementedError(f"input.format {unit.format!r} is not wired in yet")


def resolve_format(cfg: InputConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    uri = cfg.uri.rstrip("/").lower()
    if uri.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if uri.endswith(".parquet"):
        return "parquet"
    return "images"
