"""Packed archives as sources: WebDataset-style tar shards and Parquet image tables.

The driver lists shards (one recursive listing of `input.uri`, see pipeline.io.storage) and makes
one SourceUnit per shard or Parquet file; a read task streams its unit and yields one RawSample
per image, bytes undecoded. Nothing is downloaded whole before it is read.

Tar shards: members that share a key (the member path up to the first dot of its base name)
form one sample, as in WebDataset: `a/x.jpg` and `a/x.label.png` are sample `a/x` with image
`.jpg` and label `.label.png`. The image is the member whose extension is an image extension; the
label is the member with the label suffix; other members (`.json`, `.cls`, ...) are ignored.
`image_id` is `<shard path relative to input.uri>/<key>`.

Why `tarfile` over an fsspec stream rather than Ray's `read_webdataset`:
- per-sample errors: a sample without an image, a sample whose members are not adjacent, or a
  shard that is truncated becomes an errors row naming the sample, and the job goes on. Ray's
  reader (2.60) raises on non-adjacent members, failing the whole read task (a retry re-reads the
  shard from its start), and, like plain tarfile, reads a shard cut at a member boundary as
  complete; we check for the end-of-archive blocks;
- our id scheme and label pairing exactly (`<shard>/<key>`, a configurable label suffix), with
  bytes left undecoded for our own decode stage;
- streaming that survives transient store errors: the shard is read once, front to back, through
  `storage.RetryingFile`, which resumes a broken connection at the byte it had reached, so every
  sample comes back exactly once and the retries are counted;
- the same code reads every fsspec store, with the listing done once on the driver.

Parquet tables: one unit per file, read by row groups (pyarrow over an fsspec file, so memory is
one row group at a time). Columns: image bytes (`image`; a struct with a `bytes` field, as Hugging
Face datasets write images, works too), id (`image_id`), optionally label bytes.
"""

from __future__ import annotations

import itertools
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.io.decode import IMAGE_EXTENSIONS
from pipeline.io.storage import (
    RetryingFile,
    RetryPolicy,
    StoreError,
    StoreStats,
    full_uri,
    list_files,
    open_fs,
)
from pipeline.redaction import scrub
from pipeline.rows import IdSet, RawSample, SourceUnit

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet", ".pq")
DEFAULT_LABEL_SUFFIX = ".label.png"


# ---------------------------------------------------------------------------------------------
# Listing


def _list_units(
    uri: str,
    storage_options: dict[str, Any] | None,
    fmt: str,
    suffixes: tuple[str, ...],
    policy: RetryPolicy | None,
    stats: StoreStats | None,
) -> list[SourceUnit]:
    """One unit per file: `uri` itself when it names one file, else every matching file under the prefix.

    `image_ids[0]` of a unit is its file's path relative to `uri` (the file name when `uri` is the
    file): the prefix of the ids of its samples.
    """
    if uri.rstrip("/").lower().endswith(suffixes):
        fs, path = open_fs(uri, storage_options)
        return [SourceUnit(index=0, format=fmt, uris=(full_uri(fs, path),), image_ids=(posixpath.basename(path),))]
    fs, root, keys = list_files(uri, storage_options, suffixes=suffixes, policy=policy, stats=stats)
    if not keys:
        raise StoreError(uri, f"no {' / '.join(suffixes)} files under this prefix")
    return [SourceUnit(index=i, format=fmt, uris=(full_uri(fs, root + "/" + key),), image_ids=(key,)) for i, key in enumerate(keys)]


def list_tar_units(
    uri: str, storage_options: dict[str, Any] | None = None, *, policy: RetryPolicy | None = None, stats: StoreStats | None = None
) -> list[SourceUnit]:
    """One unit per `.tar` / `.tar.gz` / `.tgz` shard under `uri` (or `uri` itself), in path order."""
    return _list_units(uri, storage_options, "tar", TAR_SUFFIXES, policy, stats)


def list_parquet_units(
    uri: str, storage_options: dict[str, Any] | None = None, *, policy: RetryPolicy | None = None, stats: StoreStats | None = None
) -> list[SourceUnit]:
    """One unit per `.parquet` file under `uri` (or `uri` itself), in path order."""
    return _list_units(uri, storage_options, "parquet", PARQUET_SUFFIXES, policy, stats)


# ---------------------------------------------------------------------------------------------
# Tar shards


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/abc.label.png' -> ('dir/abc', '.label.png'): the key is the path up to the first dot of the base name."""
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    directory, base = posixpath.split(name)
    stem, dot, rest = base.partition(".")
    key = posixpath.join(directory, stem) if directory else stem
    return (key if stem else ""), (dot + rest).lower()


class _TarInfo(tarfile.TarInfo):
    """Remembers why the archive's member list ended, to tell a clean end from a truncated shard.

    tarfile stops quietly at a header it cannot read once past the first member; a shard cut
    short would look complete. Every tar writer ends an archive with zero blocks (EOFHeaderError).
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.segpipe_end = exc
            raise


class _Sample:
    """The members of one key, gathered while the stream passes over them."""

    def __init__(self, key: str):
        self.key = key
        self.images: list[tuple[str, bytes]] = []  # (member name, bytes)
        self.label: bytes | None = None
        self.problems: list[str] = []


def read_tar_unit(
    unit: SourceUnit,
    storage_options: dict[str, Any] | None = None,
    *,
    label_suffix: str | None = DEFAULT_LABEL_SUFFIX,
    labels_required: bool = False,
    policy: RetryPolicy | None = None,
    stats: StoreStats | None = None,
) -> Iterator[RawSample]:
    """The samples of one tar shard, streamed front to back (mode "r|*": plain or gzip).

    A sample without an image, or with two, is an error sample. Members of a key met again after
    other keys are an error sample with that key's id (its earlier members already came back as a
    sample: a stream cannot look ahead); the read stage sends an id once per unit, so that one is
    said as a warning (pipeline.io.source.read_and_decode). A shard that breaks inside a member makes that sample an
    error; one that breaks between members (or cannot be opened, or is not a tar) gives one error
    sample whose image_id is the shard path. Samples read before the break come back as read.
    """
    stats = stats if stats is not None else StoreStats()
    uri, shard = unit.uris[0], unit.image_ids[0]
    if label_suffix:
        label_suffix = ("" if label_suffix.startswith(".") else ".") + label_suffix.lower()
    counter = itertools.count()  # index_in_unit: position among this unit's samples

    def sample_of(group: _Sample, broken: str | None = None) -> RawSample:
        image_id = f"{shard}/{group.key}"
        out = RawSample(unit.index, next(counter), image_id, None, None, has_label=group.label is not None)
        problems = list(group.problems)
        if broken:  # the shard broke while this sample was read: what was read of it may be incomplete
            problems.append(broken)
        elif not group.images:
            problems.append("no image member" + (f" (only {label_suffix})" if group.label is not None else ""))
        elif len(group.images) > 1:
            problems.append("more than one image member: " + ", ".join(name for name, _ in group.images))
        if group.label is None and labels_required and label_suffix:
            problems.append(f"no {label_suffix} label member")
        if problems:
            out.error = f"tar {uri}: sample {group.key!r}: " + "; ".join(problems)
        else:
            out.image_bytes, out.label_bytes = group.images[0][1], group.label
        return out

    def shard_error(reason: str) -> RawSample:
        return RawSample(unit.index, next(counter), shard, None, None, error=f"tar {uri}: {reason}")

    fs, path = open_fs(uri, storage_options)
    try:
        stream = RetryingFile(fs, path, uri=uri, policy=policy, stats=stats)
    except StoreError as exc:
        yield shard_error(scrub(str(exc), storage_options))
        return

    finished: set[str] = set()  # keys already yielded: a key seen again has non-adjacent members
    group: _Sample | None = None
    position = "at its start"  # where in the shard we are, for the error of a shard that breaks
    with stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_TarInfo) as tar:
                while True:
                    member = tar.next()
                    if member is None:
                        break
                    tar.members.clear()  # stream mode keeps every header otherwise: memory would grow with the shard
                    position = f"after member {member.name}"
                    if member.isdir():
                        continue
                    key, suffix = split_member_name(member.name)
                    if not key:
                        continue  # '.hidden' files, AppleDouble '._x' entries: no sample key
                    if group is None or key != group.key:
                        if group is not None:
                            finished.add(group.key)
                            yield sample_of(group)
                        group = _Sample(key)
                        if key in finished:
                            group.problems.append(
                                f"members are not adjacent in the shard ({member.name} comes after other samples;"
                                " its earlier members were read as a sample of their own)"
                            )
                    is_label = label_suffix is not None and suffix == label_suffix
                    is_image = not is_label and suffix in IMAGE_EXTENSIONS
                    if not (is_label or is_image):
                        continue
                    if not member.isfile():
                        group.problems.append(f"member {member.name} is not a regular file")
                        continue
                    position = f"in member {member.name}"
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError("member is cut short")
                    position = f"after member {member.name}"
                    if is_label:
                        if group.label is not None:
                            group.problems.append(f"more than one {label_suffix} member")
                        group.label = data
                    else:
                        group.images.append((member.name, data))
                end = getattr(tar, "segpipe_end", None)  # set by _TarInfo, in tarfile.open too
                if not isinstance(end, tarfile.EOFHeaderError):
                    raise tarfile.ReadError("shard ends without the end-of-archive blocks" + (f" ({end})" if end else "") + ": truncated?")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:  # OSError: StoreError, gzip
            reason = f"shard unreadable {position}: " + scrub(f"{type(exc).__name__}: {exc}", storage_options)
            if group is not None and position.startswith("in member"):
                yield sample_of(group, broken=reason)  # its member is cut: the sample is lost
            else:
                if group is not None:
                    yield sample_of(group)  # its members were read whole; what follows is lost
                yield shard_error(reason)
            return
    if group is not None:
        yield sample_of(group)


# ---------------------------------------------------------------------------------------------
# Parquet image tables


def _holds_bytes(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and _holds_bytes(kind.field(index).type)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)


def _bytes_column(table: pa.Table, name: str) -> list[bytes | None]:
    column = table.column(name)
    if pa.types.is_struct(column.type):  # Hugging Face datasets' Image feature: {bytes, path}
        column = pa.chunked_array([chunk.field("bytes") for chunk in column.chunks], type=column.type.field("bytes").type)
    return column.to_pylist()


def read_parquet_unit(
    unit: SourceUnit,
    storage_options: dict[str, Any] | None = None,
    *,
    image_column: str = "image",
    id_column: str = "image_id",
    label_column: str | None = None,
    labels_required: bool = False,
    policy: RetryPolicy | None = None,
    stats: StoreStats | None = None,
) -> Iterator[RawSample]:
    """The rows of one Parquet file, a row group at a time.

    A row with a null image (or id) is an error sample; a row group that cannot be read is one
    error sample (`<file>#row-group-<n>`) and the next row group is read; a file that cannot be
    opened, or lacks a column, is one error sample whose image_id is the file path.
    """
    stats = stats if stats is not None else StoreStats()
    uri, name = unit.uris[0], unit.image_ids[0]
    index = 0

    def error(image_id: str, reason: str) -> RawSample:
        nonlocal index
        index += 1
        return RawSample(unit.index, index - 1, image_id, None, None, error=f"parquet {uri}: {scrub(reason, storage_options)}")

    fs, path = open_fs(uri, storage_options)
    try:
        handle = RetryingFile(fs, path, uri=uri, policy=policy, stats=stats)
    except StoreError as exc:
        yield error(name, str(exc))
        return
    with handle:
        try:
            table_file = pq.ParquetFile(handle)
        except (pa.ArrowException, StoreError, OSError) as exc:
            yield error(name, f"not a readable Parquet file: {type(exc).__name__}: {exc}")
            return
        present = table_file.schema_arrow.names
        wanted = [image_column, id_column] + ([label_column] if label_column else [])
        missing = [c for c in wanted if c not in present]
        if missing:
            yield error(name, f"no column {', '.join(map(repr, missing))} (columns: {', '.join(present)})")
            return
        for column in [image_column] + ([label_column] if label_column else []):
            kind = table_file.schema_arrow.field(column).type
            if not _holds_bytes(kind):
                yield error(name, f"column {column!r} holds {kind}, not image bytes")
                return
        for group_index in range(table_file.num_row_groups):
            try:
                table = table_file.read_row_group(group_index, columns=wanted)
                images = _bytes_column(table, image_column)
                labels = _bytes_column(table, label_column) if label_column else [None] * table.num_rows
                ids = table.column(id_column).to_pylist()
            except (pa.ArrowException, StoreError, OSError, TypeError) as exc:
                yield error(f"{name}#row-group-{group_index}", f"row group {group_index}: {type(exc).__name__}: {exc}")
                continue
            for row, (image_id, image, label) in enumerate(zip(ids, images, labels)):
                if image_id is None:
                    yield error(f"{name}#row-{group_index}-{row}", f"row {row} of row group {group_index} has no {id_column}")
                    continue
                sample = RawSample(unit.index, index, str(image_id), image, label, has_label=label is not None)
                index += 1
                if image is None:
                    sample.error = f"parquet {uri}: {image_column} is null"
                elif label is None and labels_required and label_column:
                    sample.error = f"parquet {uri}: {label_column} is null"
                if sample.error:
                    sample.image_bytes = sample.label_bytes = None
                yield sample


# ---------------------------------------------------------------------------------------------
# The two readers (see pipeline.io.source.Reader)


class TarReader:
    """WebDataset-style tar shards: one unit per shard; committed ids are dropped as the shard is read
    (pipeline.io.source.read_and_decode)."""

    def __init__(self, cfg: InputConfig) -> None:
        self.cfg = cfg

    def list_units(self, stats: StoreStats | None = None) -> list[SourceUnit]:
        return list_tar_units(self.cfg.uri, self.cfg.storage_options, stats=stats)

    def iter_units(self, stats: StoreStats | None = None) -> Iterator[SourceUnit]:
        return iter(self.list_units(stats))  # a shard per unit: thousands, not millions

    def read_unit(self, unit: SourceUnit, stats: StoreStats | None = None) -> Iterator[RawSample]:
        labels = self.cfg.labels
        samples = read_tar_unit(
            unit,
            self.cfg.storage_options,
            label_suffix=labels.suffix if labels else DEFAULT_LABEL_SUFFIX,
            labels_required=bool(labels and labels.required),
            stats=stats,
        )
        return samples

    def drop_done(self, units: list[SourceUnit], done: IdSet) -> list[SourceUnit]:
        return units  # what a shard holds is known once it is read: the read task drops the ids done


class ParquetReader:
    """Parquet image tables: one unit per file; committed ids are dropped as the file is read."""

    def __init__(self, cfg: InputConfig) -> None:
        self.cfg = cfg

    def list_units(self, stats: StoreStats | None = None) -> list[SourceUnit]:
        return list_parquet_units(self.cfg.uri, self.cfg.storage_options, stats=stats)

    def iter_units(self, stats: StoreStats | None = None) -> Iterator[SourceUnit]:
        return iter(self.list_units(stats))

    def read_unit(self, unit: SourceUnit, stats: StoreStats | None = None) -> Iterator[RawSample]:
        cfg = self.cfg
        samples = read_parquet_unit(
            unit,
            cfg.storage_options,
            image_column=cfg.image_column,
            id_column=cfg.id_column,
            label_column=cfg.label_column,
            labels_required=bool(cfg.labels and cfg.labels.required),
            stats=stats,
        )
        return samples

    def drop_done(self, units: list[SourceUnit], done: IdSet) -> list[SourceUnit]:
        return units  # ids are free-form and known once read: the read task drops the ids done
