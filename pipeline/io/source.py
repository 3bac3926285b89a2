"""Where images come from: one reader per input format, each with the same operations.

    iter_units(stats)        the driver's listing, streamed: units of keys, never bytes
    list_units(stats)        the same, as a list
    read_unit(unit, stats)   a read task's samples: bytes as read (or a TIFF to stream), or an error
    drop_done(units, done)   the units without the ids earlier attempts committed

`reader_for(cfg)` picks the reader from `input.format`, which the config resolves once (auto: tar or
parquet when the uri names such a file, else image files). Image folders are here; tar shards and
Parquet tables in pipeline.io.shards. A unit is one read task's worth of input: a block of
`images_per_unit` image files (with their labels), a tar shard or a Parquet file.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any, Protocol

import numpy as np

from pipeline.config import InputConfig, JobConfig
from pipeline.io.clip_plan import frame_owners, plan_clips
from pipeline.io.decode import IMAGE_EXTENSIONS, decode_sample
from pipeline.io.raster import RASTER_EXTENSIONS, probe_raster
from pipeline.io.shards import ParquetReader, TarReader
from pipeline.io.slide import DICOM_SUFFIX, SLIDE_SUFFIXES, probe_slide
from pipeline.io.storage import StoreStats, full_uri, iter_files, iter_manifest, list_files, open_fs, read_bytes
from pipeline.io.tiff import probe_stream
from pipeline.io.video import VIDEO_SUFFIXES, VideoInfo, frame_id, probe_video, read_video_unit, sampled_frames, video_stem
from pipeline.redaction import scrub
from pipeline.rows import DecodedImage, IdSet, RawSample, SourceUnit
from pipeline.telemetry import RunMetrics, StageClock, say_warning


class Reader(Protocol):
    def list_units(self, stats: StoreStats | None = None) -> list[SourceUnit]: ...
    def iter_units(self, stats: StoreStats | None = None) -> Iterator[SourceUnit]: ...
    def read_unit(self, unit: SourceUnit, stats: StoreStats | None = None) -> Iterator[RawSample]: ...
    def drop_done(self, units: list[SourceUnit], done: IdSet) -> list[SourceUnit]: ...


def glob_regex(pattern: str) -> re.Pattern:
    """A regex for a relative path glob: `**/` matches any number of directories (zero included).
    As glob.glob and a shell's globs, a wildcard never matches a name's leading dot: hidden files and
    folders (macOS's `._x.jpg` AppleDouble files, `.thumbnails/`, `.ipynb_checkpoints/`) are listed
    only by a pattern that names the dot itself (`.cache/*.png`), as the tar reader skips them too."""
    visible = r"(?!\.)[^/]*"  # one name that does not start with a dot
    out, i = [], 0
    while i < len(pattern):
        at_name = i == 0 or pattern[i - 1] == "/"  # a wildcard here would match the name's first character
        if pattern.startswith("**/", i) and at_name:
            out.append(rf"(?:{visible}/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(rf"(?:{visible}/)*{visible}" if at_name else ".*")
            i += 2
        elif pattern[i] == "*":
            out.append(visible if at_name else "[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/.]" if at_name else "[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def own_label_error(image_id: str) -> str:
    """The errors row of a file listed as an image and paired with itself as its label (the labels'
    folder is the images' folder, the pattern takes both): a mask scored against itself is no metric."""
    return f"{image_id} is its own label: input.uri and input.labels.uri list the same files (narrow input.pattern to the images)"


def key_stem(key: str) -> str:
    """A relative key without its extension: what pairs an image with its label."""
    p = PurePosixPath(key)
    return str(p.with_suffix("")) if p.suffix else key


def list_labels(uri: str, extensions: list[str], storage_options: dict, stats: StoreStats | None = None) -> dict[str, str]:
    """The label files under `uri` by key stem (`key_stem`) -> URI, from one recursive listing; where
    a stem has several, the earliest of `extensions` wins. FileNotFoundError when `uri` does not exist."""
    ranks = {ext.lower(): i for i, ext in enumerate(extensions)}
    fs, root, keys = list_files(uri, storage_options, suffixes=tuple(ranks), stats=stats)
    if not keys and not fs.exists(root):
        raise FileNotFoundError(f"labels {uri} do not exist (input.labels.uri)")
    best: dict[str, tuple[int, str]] = {}
    for key in keys:
        prefer_label(best, key, ranks)
    return {stem: full_uri(fs, root + "/" + key) for stem, (_, key) in best.items()}


def prefer_label(best: dict[str, tuple[int, str]], key: str, ranks: dict[str, int]) -> None:
    """Keep `key` as its stem's label unless one of an earlier extension (a lower rank) is there."""
    rank, stem = ranks.get(PurePosixPath(key).suffix.lower(), len(ranks)), key_stem(key)
    if stem not in best or rank < best[stem][0]:
        best[stem] = (rank, key)


def batched(items: Iterable, size: int) -> Iterator[tuple]:
    """Consecutive tuples of `size` items (the last may be shorter): itertools.batched before 3.12."""
    it = iter(items)
    while block := tuple(itertools.islice(it, size)):
        yield block


def _suffixes(extensions: list[str]) -> tuple[str, ...]:
    return tuple(ext.lower() for ext in extensions)


def pair_labels(keys: Iterable[str], label_keys: Iterable[str], extensions: list[str]) -> Iterator[tuple[str, str | None]]:
    """Each image key with the key of its label (the same stem, `key_stem`; where a stem has
    several labels, the earliest of `extensions`), from two listings in key order, holding only
    the labels between where the two listings are.

    Why it works: every key of a stem s lies in [s + ".", s + "/") ("." and "/" are adjacent code
    points), so once the label listing has passed s + "/" every label of s has been read, and once
    the image listing has passed it no image of s is left. Stems are not in key order themselves
    ("b-1.png" lists before "b.png"), hence the small dict of labels read ahead.
    """
    ranks = {ext.lower(): i for i, ext in enumerate(extensions)}
    labels = iter(label_keys)
    ahead: dict[str, tuple[int, str]] = {}  # stem -> (rank, key) of labels read, not yet passed by the images
    next_label = next(labels, None)
    for count, key in enumerate(keys):
        stem = key_stem(key)
        bound = stem + "/"
        while next_label is not None and next_label < bound:
            prefer_label(ahead, next_label, ranks)
            next_label = next(labels, None)
        found = ahead.get(stem)
        yield key, (found[1] if found else None)
        if count % 1024 == 1023:  # forget the labels of stems the images are past (kept small, amortised)
            ahead = {s: v for s, v in ahead.items() if s + "/" > key}


class ImageFolderReader:
    """Image files under input.uri matching `pattern`, paired with label files of the same relative
    key under labels.uri (the extension may differ, .png preferred), in blocks of images_per_unit."""

    suffixes: tuple[str, ...] = IMAGE_EXTENSIONS  # what is listed
    unit_format = "images"  # the units' format

    def __init__(self, cfg: InputConfig) -> None:
        self.cfg = cfg

    def list_units(self, stats: StoreStats | None = None) -> list[SourceUnit]:
        return list(self.iter_units(stats))

    def iter_units(self, stats: StoreStats | None = None) -> Iterator[SourceUnit]:
        """Units as the listing goes: one recursive listing of the images prefix and one of the
        labels prefix, streamed side by side (`pair_labels`), never a call per key and never the
        whole listing held. Raises FileNotFoundError before the first unit when input.uri does not exist."""
        cfg = self.cfg
        regex = glob_regex(cfg.pattern)
        if cfg.manifest:  # the archive's keys from a list (an S3 Inventory report): no listing of the prefix
            fs, root, keys = iter_manifest(cfg.manifest, cfg.uri, cfg.storage_options, column=cfg.manifest_column,
                                           suffixes=self.suffixes, stats=stats)  # fmt: skip
        else:
            fs, root, keys = iter_files(cfg.uri, cfg.storage_options, suffixes=self.suffixes, stats=stats)
        keys = self.listed(k for k in keys if regex.match(k))
        first = next(keys, None)
        if first is None and not cfg.manifest and not fs.exists(root):
            raise FileNotFoundError(f"{cfg.uri} does not exist (input.uri)")
        keys = itertools.chain([first] if first is not None else [], keys)
        if cfg.labels is None:
            pairs = ((k, None) for k in keys)
        elif cfg.manifest:  # a manifest's keys are sorted chunk by chunk only: its labels are held by stem
            labels = list_labels(cfg.labels.uri, cfg.labels.extensions, cfg.storage_options, stats)
            pairs = ((k, labels.get(key_stem(k))) for k in keys)
        else:
            lfs, lroot, label_keys = iter_files(cfg.labels.uri, cfg.storage_options, suffixes=_suffixes(cfg.labels.extensions), stats=stats)
            label_keys = iter(label_keys)
            head = next(label_keys, None)
            if head is None and not lfs.exists(lroot):
                raise FileNotFoundError(f"labels {cfg.labels.uri} do not exist (input.labels.uri)")
            ranked = pair_labels(keys, itertools.chain([head] if head is not None else [], label_keys), cfg.labels.extensions)
            pairs = ((k, full_uri(lfs, lroot + "/" + label) if label else None) for k, label in ranked)
        for index, block in enumerate(batched(pairs, cfg.images_per_unit)):
            yield SourceUnit(
                index=index,
                format=self.unit_format,
                uris=tuple(full_uri(fs, root + "/" + k) for k, _ in block),
                label_uris=tuple(label for _, label in block) if cfg.labels else (),
                image_ids=tuple(k for k, _ in block),
            )

    def listed(self, keys: Iterator[str]) -> Iterator[str]:
        """The listed keys that are inputs (all of them; slides keep one file of a DICOM folder)."""
        return keys

    def read_unit(self, unit: SourceUnit, stats: StoreStats | None = None) -> Iterator[RawSample]:
        """The bytes of each image (and label) of a unit; a read failure is an error sample."""
        cfg = self.cfg
        fs, _ = open_fs(cfg.uri, cfg.storage_options)
        lfs = open_fs(cfg.labels.uri, cfg.storage_options)[0] if cfg.labels else None
        for i, (uri, image_id) in enumerate(zip(unit.uris, unit.image_ids)):
            label_uri = unit.label_uris[i] if unit.label_uris else None
            sample = RawSample(unit.index, i, image_id, None, None, has_label=label_uri is not None)
            if label_uri is not None and label_uri == uri:
                sample.error = own_label_error(image_id)
                yield sample
                continue
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

    def drop_done(self, units: list[SourceUnit], done: IdSet) -> list[SourceUnit]:
        """The units without the images in `done` (one vectorised lookup for the whole listing);
        units left empty are dropped."""
        if not len(done):
            return units
        held = done.contains([i for u in units for i in u.image_ids])
        out, start = [], 0
        for unit in units:
            keep = np.flatnonzero(~held[start : start + len(unit.image_ids)])
            start += len(unit.image_ids)
            if len(keep) == len(unit.uris):
                out.append(unit)
            elif len(keep):
                out.append(
                    replace(
                        unit,
                        uris=tuple(unit.uris[i] for i in keep),
                        label_uris=tuple(unit.label_uris[i] for i in keep) if unit.label_uris else (),
                        image_ids=tuple(unit.image_ids[i] for i in keep),
                    )
                )
        return out


class RasterReader(ImageFolderReader):
    """Rasters under input.uri (pipeline.io.raster: any suffix of RASTER_EXTENSIONS matching `pattern`),
    listed and paired with label rasters as image files are. Nothing is read here but each raster's
    header (`probe_raster`): the predictor reads it window by window."""

    suffixes = RASTER_EXTENSIONS
    unit_format = "raster"

    def read_unit(self, unit: SourceUnit, stats: StoreStats | None = None) -> Iterator[RawSample]:
        cfg = self.cfg
        for i, (uri, image_id) in enumerate(zip(unit.uris, unit.image_ids)):
            label_uri = unit.label_uris[i] if unit.label_uris else None
            sample = RawSample(unit.index, i, image_id, None, None, has_label=label_uri is not None)
            if label_uri is not None and label_uri == uri:
                sample.error = own_label_error(image_id)
                yield sample
                continue
            try:
                if label_uri is None and cfg.labels is not None and cfg.labels.required:
                    sample.error = f"no label for {image_id} under {cfg.labels.uri}"
                else:
                    sample.stream = probe_raster(uri, label_uri, cfg)
            except Exception as exc:  # one unreadable raster is one errors row
                sample.error = scrub(f"read: {exc}", cfg.storage_options)
            yield sample


class SlideFolderReader(ImageFolderReader):
    """Whole-slide images (pipeline.io.slide) under input.uri matching `pattern`, no labels, in blocks
    of images_per_unit. Each slide's header is read here (levels, mpp, the bomb guard); its pixels
    are read window by window by the predictor. The plan treats the units as it does shards'
    (ids done earlier are dropped at listing and again by the read task)."""

    unit_format = "slide"
    suffixes = SLIDE_SUFFIXES

    def listed(self, keys: Iterator[str]) -> Iterator[str]:
        """A DICOM WSI is a folder of .dcm files, one per level: its first .dcm stands for it (OpenSlide
        opens the rest); every other slide is one file."""
        dicom_folders: set[str] = set()
        for key in keys:
            if key.lower().endswith(DICOM_SUFFIX):
                folder = key.rpartition("/")[0]
                if folder in dicom_folders:
                    continue
                dicom_folders.add(folder)
            yield key

    def read_unit(self, unit: SourceUnit, stats: StoreStats | None = None) -> Iterator[RawSample]:
        cfg = self.cfg
        for i, (uri, image_id) in enumerate(zip(unit.uris, unit.image_ids)):
            sample = RawSample(unit.index, i, image_id, None, None)
            try:
                sample.stream = probe_slide(uri, cfg, stats)
            except Exception as exc:  # no mpp, a bomb, not a slide: that slide's errors row
                sample.error = scrub(f"read: {exc}", cfg.storage_options)
            yield sample


class VideoReader(ImageFolderReader):
    """Video files (pipeline.io.video) under input.uri matching `pattern`: each video's sampled frames
    (input.video) in units of images_per_unit frames, one video per unit, each frame with its label
    `<labels uri>/<video stem>/<frame index>.png` where there is one. The driver reads each video's
    header here (its frame count: one demux pass where the header states none); the read tasks decode.
    A video that cannot be opened here is a unit of its own, its key for an id: its errors row.

    With `clips` (clip_length, clip_stride: a clip model's run) a unit is one clip of a video's sampled
    frames (pipeline.io.clip_plan.plan_clips; format "clip"): its frames' ids, the clip's place in the
    video (`SourceUnit.clip`) and which of its frames it owns (`frame_owners`: the clip writes their
    masks; its other frames are context shared with the clips beside it). Its read task sends the
    whole clip as one row (`read_clip`). A resume re-runs a clip while any frame it owns is not
    committed, writing only those frames."""

    def __init__(self, cfg: InputConfig, clips: tuple[int, int] | None = None) -> None:
        super().__init__(cfg)
        self.clips = clips

    unit_format = "video"
    suffixes = VIDEO_SUFFIXES

    def iter_units(self, stats: StoreStats | None = None) -> Iterator[SourceUnit]:
        cfg = self.cfg
        regex = glob_regex(cfg.pattern)
        fs, root, keys = iter_files(cfg.uri, cfg.storage_options, suffixes=self.suffixes, stats=stats)
        keys = (k for k in keys if regex.match(k))
        first = next(keys, None)
        if first is None and not fs.exists(root):
            raise FileNotFoundError(f"{cfg.uri} does not exist (input.uri)")
        # a clip model's labels are one YouTube-VIS JSON (pipeline.metrics.coco_labels.YtvisLabels), not frames
        labels = (
            list_labels(cfg.labels.uri, cfg.labels.extensions, cfg.storage_options, stats) if cfg.labels and self.clips is None else None
        )
        index = 0
        for key in itertools.chain([first] if first is not None else [], keys):
            uri = full_uri(fs, root + "/" + key)
            try:
                info = probe_video(uri, cfg.storage_options, stats)
            except Exception:  # its read task opens it again and says why, as the video's errors row
                yield SourceUnit(index, self.unit_format, (uri,), (None,) if labels is not None else (), (key,))
                index += 1
                continue
            stem = video_stem(key)
            frames = sampled_frames(info.frames, info.rate, cfg.video.every_n, cfg.video.fps)
            if self.clips is not None:
                for unit in clip_units(index, uri, key, frames, *self.clips):
                    yield replace(unit, seek_to=stamp_of(info, frames[unit.clip[1]]))
                    index += 1
                continue
            for block in batched(frames, cfg.images_per_unit):
                yield SourceUnit(
                    index=index,
                    format=self.unit_format,
                    uris=(uri,) * len(block),
                    label_uris=tuple(labels.get(f"{stem}/{i}") for i in block) if labels is not None else (),
                    image_ids=tuple(frame_id(key, i) for i in block),
                    seek_to=stamp_of(info, block[0]),
                )
                index += 1

    def read_unit(self, unit: SourceUnit, stats: StoreStats | None = None) -> Iterator[RawSample]:
        return read_video_unit(unit.index, unit.uris, unit.image_ids, unit.label_uris, self.cfg, stats, unit.seek_to)

    def drop_done(self, units: list[SourceUnit], done: IdSet) -> list[SourceUnit]:
        """Frame units as image folders drop ids; a clip unit stays whole (its frames are the model's
        context) while a frame it owns is not in `done`, owning only those now; else it is dropped."""
        clips = [u for u in units if u.format == "clip"]
        if not clips:
            return super().drop_done(units, done)
        frames = super().drop_done([u for u in units if u.format != "clip"], done)
        ids = [i for u in clips for i in u.image_ids]
        held = done.contains(ids) if len(done) else np.zeros(len(ids), bool)
        out, start = [], 0
        for unit in clips:
            owned = tuple(bool(o) and not bool(h) for o, h in zip(unit.owned, held[start : start + len(unit.image_ids)]))
            start += len(unit.image_ids)
            if any(owned):
                out.append(replace(unit, owned=owned))
        return sorted(frames + out, key=lambda u: u.index)


def stamp_of(info: VideoInfo, index: int) -> tuple[int, ...]:
    """A unit's SourceUnit.seek_to: (its first frame, that frame's timestamp) for a variable-rate video."""
    return (index, info.stamps[index]) if info.stamps is not None else ()


def clip_units(first_index: int, uri: str, key: str, frames: list[int], clip_length: int, clip_stride: int) -> Iterator[SourceUnit]:
    """A video's clip units (VideoReader with clips), numbered from `first_index`: `frames` are its
    sampled frames' numbers; the clips are planned over their positions."""
    clips = plan_clips(len(frames), clip_length, clip_stride)
    owners = frame_owners(clips)
    for k, clip in enumerate(clips):
        positions = range(clip.start, clip.stop)
        yield SourceUnit(
            index=first_index + k,
            format="clip",
            uris=(uri,) * clip.length,
            image_ids=tuple(frame_id(key, frames[p]) for p in positions),
            clip=(k, clip.start, clip.stop, len(frames)),
            owned=tuple(bool(owners[p] == k) for p in positions),
        )


def read_clip(unit: SourceUnit, cfg: InputConfig, stats: StoreStats | None = None, monitor=None) -> Iterator[DecodedImage]:
    """A clip unit's read: its frames decoded and sent as ONE row (DecodedImage.clip), so that Ray Data
    never splits a clip between predictor calls or actors; where a frame fails (or the frames differ
    in size), no clip: an errors row for each frame it owns, naming the frame that failed. The frames'
    warnings are said (say_warning)."""
    samples = list(read_video_unit(unit.index, unit.uris, unit.image_ids, (), cfg, stats, unit.seek_to))
    for sample in samples:
        if sample.warning:
            say_warning(sample.warning, monitor)
    owned = [bool(o) for o in unit.owned]
    key = unit.image_ids[0].rsplit("#", 1)[0]
    problem = next((f"frame {s.image_id}: {s.error}" for s in samples if s.error), None)
    if problem is None and len({s.pixels.shape for s in samples}) > 1:
        problem = "its frames differ in size: " + ", ".join(sorted({f"{s.pixels.shape[1]} x {s.pixels.shape[0]}" for s in samples}))
    if problem is not None:
        for sample, own in zip(samples, owned):
            if own:
                error = sample.error or f"read: clip {int(unit.clip[0])} of {key} not segmented: {problem}"
                yield DecodedImage(unit=unit.index, image_id=sample.image_id, timestamp_s=sample.timestamp_s).failed("read", error)
        return
    height, width = samples[0].pixels.shape[:2]
    clip_index, start, stop, video_frames = (int(v) for v in unit.clip)
    yield DecodedImage(
        unit=unit.index,
        image_id=next(s.image_id for s, own in zip(samples, owned) if own),
        image=np.concatenate([s.pixels for s in samples], axis=0),  # (T * height) x width x 3
        height=height,
        width=width,
        clip={
            "video": key,
            "index": clip_index,
            "start": start,
            "stop": stop,
            "video_frames": video_frames,
            "ids": [s.image_id for s in samples],
            "timestamps": [s.timestamp_s for s in samples],
            "owned": owned,
        },
    )


READERS: dict[str, type] = {
    "images": ImageFolderReader,
    "tar": TarReader,
    "parquet": ParquetReader,
    "raster": RasterReader,
    "slide": SlideFolderReader,
    "video": VideoReader,
}


def reader_for(cfg: InputConfig, clips: tuple[int, int] | None = None) -> Reader:
    """The reader of input.format; `clips` (clip_length, clip_stride): a clip model's video units."""
    if clips is not None:
        return VideoReader(cfg, clips)
    return READERS[cfg.format](cfg)


def again_in_unit(unit: SourceUnit, sample: RawSample) -> str:
    """The warning for a sample whose image_id its unit gave already: it is left out (an id is one
    image, one mask, one outcome), the first one with that id is the one segmented."""
    why = sample.error.split(": ", 1)[-1] if sample.error else "another row with the same id"
    return (
        f"{unit.uris[0]}: image_id {sample.image_id!r} comes again in the same {unit.format} file ({why}); "
        "only its first is segmented, this one is left out"
    )


def read_and_decode(row: dict[str, Any], *, cfg: JobConfig, monitor=None, done: IdSet | None = None) -> Iterator[dict[str, Any]]:
    """The read stage (a Ray task per unit): one DecodedImage per image, then the unit's end (how
    many image rows came before it). A failure is a row with its error set. What the store did
    (retries, failures) goes to the run monitor (pipeline.plan) when the unit ends. `done`: ids
    that earlier attempts committed, dropped as a shard is read (image folders drop them when listed)."""
    unit = SourceUnit.from_record(row)
    stats = StoreStats()
    metrics = RunMetrics(cfg.run_id or "")
    clock = StageClock()
    panoptic = cfg.metrics.panoptic_labels is not None
    sent = 0
    try:
        if unit.format == "clip":  # one row for the clip (or errors rows for the frames it owns)
            started = time.perf_counter()
            for decoded in read_clip(unit, cfg.input, stats, monitor):
                yield decoded.to_record()
            clock.add("read", time.perf_counter() - started)
            # the writer gets one image row per frame the clip owns (the predictor makes them)
            yield DecodedImage.unit_end(unit.index, sum(bool(o) for o in unit.owned)).to_record()
            return
        samples = iter(reader_for(cfg.input).read_unit(unit, stats))
        sent_ids: set[str] = set()  # an id comes once per unit: the writer commits a unit when each of its ids has
        while True:
            started = time.perf_counter()
            sample = next(samples, None)
            clock.add("read", time.perf_counter() - started)
            if sample is None:
                break
            if sample.warning:
                say_warning(sample.warning, monitor)
            if done is not None and sample.image_id in done:
                continue
            if sample.image_id in sent_ids:  # a Parquet table's id twice, a tar key met again after other samples
                say_warning(again_in_unit(unit, sample), monitor)
                continue
            sent_ids.add(sample.image_id)
            metrics.bytes_read(len(sample.image_bytes or b"") + len(sample.label_bytes or b""))
            started = time.perf_counter()
            decoded = decode_sample(sample, cfg.input.max_pixels, exif_transpose=cfg.input.exif_transpose, panoptic=panoptic)
            clock.add("decode", time.perf_counter() - started)
            yield decoded.to_record()
            sent += 1
        yield DecodedImage.unit_end(unit.index, sent).to_record()
    finally:
        if monitor is not None:
            import ray

            clock.send(monitor)
            ray.get(monitor.add_store_stats.remote(stats.as_dict()))  # before the task ends, so the driver sees it
