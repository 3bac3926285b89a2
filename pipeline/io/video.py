"""Video files (`input.format: video`, the `video` extra): frames decoded by PyAV in the read tasks.

Each video (mp4, mkv, webm, mov, avi under input.uri, matching input.pattern) is opened through the
storage layer (`RetryingFile`: fsspec file objects, retries, store stats), never downloaded whole:
PyAV reads the container from the file object. Its first video stream is the one segmented.

Frames. A frame's id is `<video key>#<frame index>`, the index counted over all decoded frames of
the stream from 0; its presentation timestamp (pts x time base, seconds) goes to the masks table's
`timestamp_s`. Which frames are segmented (`sampled_frames`): `every_n: n`, the frames whose index
is a multiple of n; `fps: f`, for k = 0, 1, ... the frame nearest to k / f seconds from the first
frame, by the stream's average frame rate r (frame round(k r / f), each once: every frame when f >= r).

Units. The driver plans units without decoding: a video's frame count is its stream header's
(`stream.frames`) where the container states it (mp4, mov), else one demux pass that counts the
stream's packets (mkv, webm; no frame decoded). Its sampled frames go in units of
input.images_per_unit (one video per unit), each with the frames' ids and label URIs, so that a
resumed run drops the ids committed earlier (`drop_done`) and reads only units with frames left. A
read task seeks to the keyframe at or before its unit's first frame (`container.seek`) and decodes
from there to its last frame. After a seek the keyframe's index is its timestamp times the average
frame rate: exact for constant-frame-rate video, wrong for a variable-rate one (a phone's, a screen
capture's). The listing sees one on its packets' timestamps (`at_constant_rate`), read in its demux
pass where the header states no count or states a base rate other than the average: such a video's
units seek by the timestamp of their first frame (SourceUnit.seek_to) and count from it. A unit that
seeks by the rate all the same checks each frame up to its first against the next (`_frames_from`)
and counts from the start at the first that disagrees. A unit that starts at frame 0 decodes from
the start and counts. A header may state fewer frames than the stream holds (a recorder that died
before it finished its header): the video's last unit decodes on past its last frame, and a frame
at or past the stated count is a warning (`decode_frames`), never frames left out without a word.

Labels: `<labels uri>/<video stem>/<frame index>.png` (any of input.labels.extensions), the video
stem being its key without the extension: `cams/a.mp4` frame 12 -> `cams/a/12.png`.

Bad input: a video that cannot be opened is one errors row (id: its key); a stream that fails or
ends before a frame of the unit gives that frame an errors row naming where decoding stopped, and
every later frame of the unit one, the frames before them being segmented and committed.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from pipeline.extras import require
from pipeline.io.storage import RetryingFile, StoreStats, open_fs, read_bytes
from pipeline.io.tiff import PROBE_BLOCK_BYTES, READ_BLOCK_BYTES
from pipeline.redaction import scrub
from pipeline.rows import RawSample

log = logging.getLogger("segpipe.video")

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi")
FRAME_ID = re.compile(r"^(?P<key>.+)#(?P<index>\d+)$")


def require_video(what: str = "input.format: video") -> None:
    require("av", "video", what)


def frame_id(key: str, index: int) -> str:
    return f"{key}#{index}"


def split_frame_id(image_id: str) -> tuple[str, int] | None:
    """(video key, frame index) of a frame id, None for an id that is none (a video's own errors row)."""
    match = FRAME_ID.match(image_id)
    return (match["key"], int(match["index"])) if match else None


def video_stem(key: str) -> str:
    """A video's key without its extension: the folder of its frames' labels (and exported masks)."""
    p = PurePosixPath(key)
    return str(p.with_suffix("")) if p.suffix else key


@dataclass(frozen=True)
class VideoInfo:
    """What the driver needs of a video to plan its units."""

    frames: int  # frames in the stream
    rate: Fraction  # average frames per second
    height: int
    width: int
    counted: bool  # frames counted by a demux pass (the header states none)
    # a variable-rate stream's presentation timestamps, frame by frame (what its units seek by); None
    # where each frame's index is its timestamp times `rate` (constant rate: a seek by the rate is exact)
    stamps: list[int] | None = None


def _open_container(file: Any):
    import av

    return av.open(file, mode="r")


def _video_stream(container: Any, uri: str):
    if not container.streams.video:
        raise ValueError(f"{uri}: no video stream")
    return container.streams.video[0]


def _frame_rate(stream: Any) -> Fraction | None:
    """The stream's average frame rate (else the guessed or base rate): what frame indices and
    seeks are counted by; None where the stream states none."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else None


def probe_video(uri: str, storage_options: dict | None = None, stats: StoreStats | None = None) -> VideoInfo:
    """A video's frame count, average rate and size from its header; the frame count by one demux pass
    (packets counted, none decoded) where the header states none."""
    fs, path = open_fs(uri, storage_options)
    with RetryingFile(fs, path, uri=uri, stats=stats, block_size=PROBE_BLOCK_BYTES) as file, _open_container(file) as container:
        stream = _video_stream(container, uri)
        rate = _frame_rate(stream)
        if not rate:
            raise ValueError(f"{uri}: the video stream states no frame rate")
        frames, counted, stamps = int(stream.frames or 0), False, None
        # the packets' timestamps where the header states no count, or states a base rate other than
        # the average (a variable rate, likely): one demux pass, no frame decoded
        if frames <= 0 or (stream.base_rate and Fraction(stream.base_rate) != rate):
            stamps = sorted(packet.pts for packet in container.demux(stream) if packet.size and packet.pts is not None)
            frames, counted = len(stamps), True
            if at_constant_rate(stamps, stream.start_time or 0, stream.time_base, rate):
                stamps = None
        return VideoInfo(frames, rate, int(stream.height), int(stream.width), counted, stamps)


def at_constant_rate(stamps: list[int], start: int, time_base: Fraction, rate: Fraction) -> bool:
    """Whether each presentation timestamp (in order), times `rate`, rounds to its frame's index: what
    tells a frame's index after a seek (see the module's docstring). A variable-rate recording (a
    phone's, a screen capture's) does not: its units seek by the timestamp of a frame of theirs."""
    return all(round((stamp - start) * time_base * rate) == index for index, stamp in enumerate(stamps))


def sampled_frames(frames: int, rate: Fraction, every_n: int = 1, fps: float | None = None) -> list[int]:
    """The frame indices segmented of a video of `frames` frames at `rate` frames per second (see the
    module's docstring): every every_n-th, or the frame nearest to each k / fps seconds, each once."""
    if fps is None:
        return list(range(0, frames, every_n))
    step = Fraction(rate) / Fraction(fps)  # frames per sample
    if step <= 1:
        return list(range(frames))
    out, k = [], 0
    while (index := math.floor(k * step + Fraction(1, 2))) < frames:
        out.append(index)
        k += 1
    return out


def decode_frames(
    uri: str,
    wanted: list[int],
    storage_options: dict | None = None,
    stats: StoreStats | None = None,
    warnings: list[str] | None = None,
    sampling: tuple[int, float | None] | None = None,
    seek_to: tuple[int, ...] = (),
    autorotate: bool = False,
) -> Iterator[tuple[int, float | None, np.ndarray | None, str | None]]:
    """(frame index, timestamp in seconds, H x W x 3 uint8 RGB, None) for each index of `wanted`
    (ascending), decoded from the keyframe at or before the first; where the stream fails or ends
    first, (index, None, None, error) for each frame not reached. A frame whose size is not the one
    before it (the stream header's, for the first) is decoded at its own size, and said once per
    change in `warnings`. `sampling` (every_n, fps): where `wanted` ends with the last frame sampled
    of the frame count the header states, the stream is decoded on past it, and a frame at or past
    that count is said in `warnings` before the last frame is yielded: those frames were never
    planned (units come from the header's count), and would otherwise be left out without a word.
    `seek_to` (index, timestamp) of a frame at or before the first of `wanted`: a variable-rate stream's
    seek (SourceUnit.seek_to), by that timestamp, the frames counted from that frame. `autorotate`:
    each frame turned upright by its display matrix (`upright`)."""
    wanted = sorted(wanted)
    fs, path = open_fs(uri, storage_options)
    reached = -1  # the last frame decoded
    error = None
    with RetryingFile(fs, path, uri=uri, stats=stats, block_size=READ_BLOCK_BYTES) as file:
        try:
            container = _open_container(file)
        except Exception as exc:
            for index in wanted:
                yield index, None, None, f"video not opened: {type(exc).__name__}: {exc}"
            return
        with container:
            todo = iter(wanted)
            target = next(todo, None)
            try:
                stream = _video_stream(container, uri)
                stream.thread_type = "AUTO"
                size = (int(stream.width), int(stream.height))  # the header's
                said_turn: set[str] = set()  # what `upright` said, once a video
                stated = _stated_end(stream, wanted, sampling)
                decoded = _frames_from(container, stream, wanted[0] if wanted else 0, seek_to)
                for index, frame in decoded:
                    reached = index
                    if (frame.width, frame.height) != size:
                        if warnings is not None:
                            warnings.append(
                                f"{uri}: the frame size changes mid-stream at frame {index}, {size[0]} x {size[1]} -> "
                                f"{frame.width} x {frame.height}: its frames are segmented at their own size"
                            )
                        size = (frame.width, frame.height)
                    while target is not None and target < index:  # a frame the stream skipped
                        yield target, None, None, f"frame {target} not in the stream (frames went from {index - 1} to {index})"
                        target = next(todo, None)
                    if target is None:
                        break
                    if index == target:
                        seconds = float(frame.pts * stream.time_base) if frame.pts is not None else None
                        pixels = frame.to_ndarray(format="rgb24")
                        if autorotate:
                            pixels, note = upright(pixels, frame)
                            if note and note not in said_turn and warnings is not None:
                                said_turn.add(note)
                                warnings.append(f"{uri}: {note}")
                        target = next(todo, None)
                        if target is None and stated is not None and warnings is not None:
                            past = next((later for later, _ in decoded if later >= stated), None)
                            if past is not None:
                                warnings.append(
                                    f"{uri}: the stream goes on past the {stated} frames its header states (frame {past} "
                                    f"decoded): frames from {stated} on are not segmented; remux the file (ffmpeg -i in -c copy "
                                    "out) so that its header counts every frame"
                                )
                        yield index, seconds, pixels, None
                        if target is None:
                            break
            except Exception as exc:
                error = f"decoding failed at frame {reached + 1}: {type(exc).__name__}: {exc}"
            if target is not None:
                why = error or f"the video ended after frame {reached} (its frames were counted before the run)"
                while target is not None:
                    yield target, None, None, why
                    target = next(todo, None)


def upright(pixels: np.ndarray, frame: Any) -> tuple[np.ndarray, str | None]:
    """The frame as a player shows it: turned by its display matrix (the stream's, which FFmpeg hands
    every decoded frame), in quarter turns as FFmpeg's autorotate turns it (a rotation of 90 degrees
    counter-clockwise is np.rot90 once). A matrix that mirrors the picture, or turns it by other than
    quarter turns, leaves the frame as stored, and says so (the note)."""
    matrix = next((np.frombuffer(bytes(d), np.int32) for d in frame.side_data if str(d.type).endswith("DISPLAYMATRIX")), None)
    if matrix is None or len(matrix) != 9:
        return pixels, None
    a, b, c, d = (float(v) / 65536 for v in matrix[[0, 1, 3, 4]])  # 16.16 fixed point
    if not (math.hypot(a, c) and math.hypot(b, d)):
        return pixels, "its display matrix is singular: frames are left as stored"
    # libavutil's av_display_rotation_get: degrees counter-clockwise
    rotation = -math.degrees(math.atan2(b / math.hypot(b, d), a / math.hypot(a, c)))
    turns = round(rotation / 90.0)
    if a * d - b * c < 0:
        return pixels, "its display matrix mirrors frames: they are segmented as stored, neither turned nor mirrored"
    if abs(rotation - 90.0 * turns) > 1.0:
        return pixels, f"its display matrix turns frames by {rotation:.4g} degrees, not a quarter turn: they are segmented as stored"
    return (np.ascontiguousarray(np.rot90(pixels, turns % 4)) if turns % 4 else pixels), None


def _stated_end(stream: Any, wanted: list[int], sampling: tuple[int, float | None] | None) -> int | None:
    """The frame count the header states, where `wanted` ends with the last frame sampled of it (the
    video's last unit, planned from that count); else None."""
    stated = int(stream.frames or 0)
    rate = _frame_rate(stream)
    if sampling is None or stated <= 0 or not wanted or not rate:
        return None
    planned = sampled_frames(stated, rate, *sampling)
    return stated if planned and wanted[-1] == planned[-1] else None


def _frames_from(container: Any, stream: Any, first: int, seek_to: tuple[int, ...] = ()) -> Iterator[tuple[int, Any]]:
    """(index, frame) of the stream's frames from the keyframe at or before frame `first` on: a seek
    when first > 0, the keyframe's index from its timestamp (see the module's docstring); from the
    start, counted, where the demuxer lands past `first`, or where a frame up to `first` has a
    timestamp that does not give its index (a stream not at a constant rate, that the listing did not
    see as one): nothing at or past `first` is yielded before its index is checked. `seek_to` (index,
    timestamp): a seek by that frame's timestamp, the frames before it dropped, counted from it."""
    if seek_to and seek_to[0] > 0:
        index, stamp = seek_to
        container.seek(stamp, stream=stream, backward=True)
        frames = container.decode(stream)
        for frame in frames:
            if frame.pts is None or frame.pts > stamp:
                break  # not the stream the listing read: counted from the start below
            if frame.pts == stamp:
                yield index, frame
                yield from enumerate(frames, start=index + 1)
                return
        frames.close()
        container.seek(stream.start_time or 0, stream=stream, backward=True)
        first = 0
    if first > 0:
        rate = _frame_rate(stream)
        time_base, start = stream.time_base, stream.start_time or 0
        container.seek(start + math.floor(Fraction(first) / rate / time_base), stream=stream, backward=True)

        def stamped(frame) -> int | None:  # the frame's index from its timestamp
            return None if frame.pts is None else round((frame.pts - start) * time_base * rate)

        frames = container.decode(stream)
        frame = next(frames, None)
        if frame is None:
            return
        index = stamped(frame) or 0
        if index <= first:
            following, constant = next(frames, None), True
            while following is not None and index <= first:  # each frame up to `first` against the next
                if stamped(following) not in (None, index + 1):
                    constant = False  # counted from the start below (the frames yielded so far are not wanted)
                    break
                yield index, frame
                frame, index, following = following, index + 1, next(frames, None)
            if constant:
                yield index, frame
                if following is not None:
                    yield index + 1, following
                    yield from enumerate(frames, start=index + 2)
                return
        frames.close()
        container.seek(start, stream=stream, backward=True)
    yield from enumerate(container.decode(stream))


def read_video_unit(
    unit_index: int,
    uris: tuple[str, ...],
    image_ids: tuple[str, ...],
    label_uris: tuple[str | None, ...],
    cfg: Any,
    stats: StoreStats | None = None,
    seek_to: tuple[int, ...] = (),
) -> Iterator[RawSample]:
    """A video unit's samples: each frame decoded (RGB pixels, its timestamp, its label's bytes), or an
    errors row. cfg: the job's InputConfig. A unit whose id is the video's key (it failed at listing)
    is that video's errors row. `seek_to`: the unit's (SourceUnit.seek_to)."""
    labels_required = cfg.labels is not None and cfg.labels.required
    lfs = open_fs(cfg.labels.uri, cfg.storage_options)[0] if cfg.labels else None
    frames = [(i, split_frame_id(image_id)) for i, image_id in enumerate(image_ids)]
    for i, parts in frames:
        if parts is None:  # not probed at listing: say why now
            sample = RawSample(unit_index, i, image_ids[i], None, None)
            try:
                probe_video(uris[i], cfg.storage_options, stats)
                sample.error = "read: the video could not be opened when it was listed: rerun to segment its frames"
            except Exception as exc:
                sample.error = scrub(f"read: {exc}", cfg.storage_options)
            yield sample
    positions = {parts[1]: i for i, parts in frames if parts is not None}
    if not positions:
        return
    uri = uris[next(iter(positions.values()))]
    warnings: list[str] = []  # said with the next frame's sample
    for index, seconds, pixels, error in decode_frames(
        uri, list(positions), cfg.storage_options, stats, warnings, (cfg.video.every_n, cfg.video.fps), seek_to, cfg.video.autorotate
    ):
        i = positions[index]
        label_uri = label_uris[i] if label_uris else None
        sample = RawSample(unit_index, i, image_ids[i], None, None, has_label=label_uri is not None, timestamp_s=seconds)
        if warnings:
            sample.warning = scrub("; ".join(warnings), cfg.storage_options)
            warnings.clear()
        if error is not None:
            sample.error = scrub(f"read: {error}", cfg.storage_options)
            yield sample
            continue
        height, width = pixels.shape[:2]
        if height * width > cfg.max_pixels:
            sample.error = f"frame of {width} x {height} = {width * height} pixels is over the limit of {cfg.max_pixels} (input.max_pixels)"
            yield sample
            continue
        sample.pixels = pixels
        try:
            if label_uri is not None:
                sample.label_bytes = read_bytes(lfs, label_uri, stats=stats)
            elif labels_required:
                sample.error = f"no label for {image_ids[i]} under {cfg.labels.uri}"
        except Exception as exc:
            sample.error = scrub(f"read: label: {exc}", cfg.storage_options)
        yield sample
