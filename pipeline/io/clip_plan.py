"""Clip windows in time: where the clips of a video go and which clip owns each frame's mask (the
rule: pipeline.predict.clips' docstring). Here, below the read stage, because the video reader plans
one unit per clip (pipeline.io.source.VideoReader with a clip model); pure numpy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Clip:
    """Frames start..stop-1 (positions in the video's sampled frames)."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def centre(self) -> float:
        return (self.start + self.stop - 1) / 2


def plan_clips(num_frames: int, clip_length: int, clip_stride: int) -> list[Clip]:
    """The clips of a video of `num_frames` sampled frames (the rule: the module's docstring)."""
    if clip_length < 1 or clip_stride < 1:
        raise ValueError(f"clip_length {clip_length} and clip_stride {clip_stride} must be at least 1")
    if clip_stride > clip_length:
        raise ValueError(f"clip_stride {clip_stride} is larger than clip_length {clip_length}: frames would be skipped")
    if num_frames < 1:
        return []
    if num_frames <= clip_length:
        return [Clip(0, num_frames)]
    count = math.ceil((num_frames - clip_length) / clip_stride) + 1
    return [Clip(start, start + clip_length) for start in (min(i * clip_stride, num_frames - clip_length) for i in range(count))]


def frame_owners(clips: Sequence[Clip]) -> np.ndarray:
    """For each frame 0..N-1, the index of the clip that owns its masks: of the clips that hold
    the frame, the one whose centre is nearest (the earlier on a tie)."""
    num_frames = max((c.stop for c in clips), default=0)
    owners = np.full(num_frames, -1, np.int64)
    best = np.full(num_frames, np.inf)
    for k, clip in enumerate(clips):
        frames = np.arange(clip.start, clip.stop)
        distance = np.abs(frames - clip.centre)
        better = distance < best[frames]
        owners[frames[better]], best[frames[better]] = k, distance[better]
    return owners
