"""Clip windows in time, as sliding windows are in space: where the clips of a video go, which clip
owns each frame's mask, and the instance sequences of consecutive clips joined into tracks.

Pure numpy (masks leave as COCO RLE, pipeline.io.coco_codec): no torch, no Ray, no I/O. Read top
to bottom:
  the plan      `plan_clips`, `Clip`, `frame_owners` (defined in pipeline.io.clip_plan: the reader's too)
  tracks        `Track`, `TrackJoiner` (incremental, clip by clip) and `join_tracks`

Frames are counted by position in the video's sampled frames (0..N-1: every frame, or every n-th,
or at a target fps; the reader knows which frame of the file each one is): a `Clip` is a range of
positions. `TrackJoiner(..., frame_numbers=...)` writes the file's frame numbers into the tracks.

The plan. Clips of `clip_length` frames every `clip_stride` frames, as many as it takes to reach
the end, the last one moved back so that it ends at the last frame (ceil((N - L) / S) + 1 clips,
as pipeline.predict.tiling places windows). A video of fewer frames than `clip_length` is one
short clip of all its frames: a clip model fills it to the length it was trained on (VisTR repeats
the frames in order, as its original inference does for a short video) and returns only its own
frames. `clip_stride <= clip_length` (no frame left out); tracks join across clips only where
clips share frames (`clip_stride < clip_length`).

Ownership. Where clips overlap, a frame's mask of a track comes from the clip whose centre is
nearest the frame (the earlier clip on a tie): the clip that sees most context on both sides of it,
as the stitcher prefers a window's middle to its edge. When the owner holds no piece of the track
(the track ended or began inside the overlap, as that clip saw it), the nearest clip that holds one
gives the mask.

Tracks. Each clip's instance sequences (models.vistr.instance_sequences: a class, a score, T masks)
are pieces of tracks. Two sequences of consecutive clips are the same track when they have the
same class and their masks over the frames both clips cover have IoU >= `iou_threshold` (the
intersections summed over those frames over the unions summed, YouTube-VIS's spatio-temporal IoU;
a frame the sequence marks absent counts as an empty mask), and share at least one pixel. "Same
track" is closed transitively (union-find), so a track through five clips is one; sequences of one
clip are never compared with each other (the model said they are distinct), though they can meet in
one track through a sequence of a neighbouring clip: that track's mask in a frame is then the union
of theirs. A track's score is the mean of its sequences' scores weighted by their mask areas (summed
over their frames), as pipeline.predict.objects merges window pieces; its class is theirs.
Track ids run 1, 2, .. in a video, in the order tracks finish (0 is free for "no track" in an
instance-id map). Memory: a joiner holds the previous clip's masks on the frames it shares with the
next, and the open tracks' masks as RLE.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pipeline.io.clip_plan import Clip, frame_owners, plan_clips
from pipeline.io.coco_codec import decode_rle, encode_rle
from pipeline.predict.piece_groups import PieceGroups

__all__ = ["Clip", "Track", "TrackJoiner", "frame_owners", "join_tracks", "plan_clips"]

# The plan (`plan_clips`, `Clip`, `frame_owners`) lives in pipeline.io.clip_plan, where the video reader
# plans a unit per clip; imported here so that this module reads as one.

# ---------------------------------------------------------------------------------------------
# Tracks
# ---------------------------------------------------------------------------------------------


class InstanceSequenceLike(Protocol):
    """What a clip model's instance sequence gives (models.vistr.InstanceSequence is one):
    label, score, masks T x H x W bool, and optionally present (T,) bool (False: no mask there)."""

    label: int
    score: float
    masks: np.ndarray


@dataclass
class Track:
    """One object through a video: its class and score, its first and last frame (the file's frame
    numbers where the joiner was given them, else positions), and its mask in each frame where it
    has one, as COCO RLE of the full frame."""

    video_id: str
    track_id: int
    label: int
    score: float
    first_frame: int
    last_frame: int
    masks: dict[int, dict] = field(default_factory=dict)  # frame -> RLE, frames in order
    # the instance sequences it joined: (clip index, the sequence's `instance` where it has one, else
    # its position in that clip's sequences), in clip order
    pieces: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Piece:
    """One clip's instance sequence: its masks as RLE per frame position where it has one."""

    clip: int
    instance: int  # the sequence's `instance` (its slot), else its position in the clip's sequences
    label: int
    score: float
    area: int
    frames: dict[int, dict]  # frame position -> RLE (non-empty masks only)


class TrackJoiner:
    """Joins one video's clips' instance sequences into tracks, clip by clip.

    `add(sequences)` for each clip of `clips` in order (the sequences' masks T x H x W over that
    clip's frames) returns the tracks that this clip made final (none of their pieces is in it);
    `finish()` returns the rest. The rule is in the module's docstring.
    """

    def __init__(
        self, video_id: str, clips: Sequence[Clip], iou_threshold: float = 0.5, frame_numbers: Sequence[int] | None = None
    ) -> None:
        self.video_id = video_id
        self.clips = list(clips)
        self.iou_threshold = iou_threshold
        self._owners = frame_owners(self.clips)
        if frame_numbers is not None and len(frame_numbers) < len(self._owners):
            raise ValueError(f"{len(frame_numbers)} frame numbers for {len(self._owners)} frames")
        self._numbers = None if frame_numbers is None else [int(n) for n in frame_numbers]
        self._groups: PieceGroups[_Piece] = PieceGroups()
        self._next_track = 1
        self._clip = 0
        # the previous clip's pieces: arrival number -> masks on the frames it shares with the next clip
        self._previous: dict[int, np.ndarray] = {}

    def add(self, sequences: Iterable[InstanceSequenceLike]) -> list[Track]:
        if self._clip >= len(self.clips):
            raise ValueError(f"all {len(self.clips)} clips have been added")
        k, clip = self._clip, self.clips[self._clip]
        self._clip += 1
        shared_before = range(clip.start, self.clips[k - 1].stop) if k else range(0)
        after = self.clips[k + 1] if k + 1 < len(self.clips) else None
        shared_after = range(after.start, clip.stop) if after is not None else range(0)
        current: dict[int, np.ndarray] = {}
        for position, sequence in enumerate(sequences):
            masks = np.asarray(sequence.masks, bool)
            if masks.ndim != 3 or masks.shape[0] != clip.length:
                raise ValueError(
                    f"clip {k} holds frames {clip.start}..{clip.stop - 1}: masks of shape {masks.shape} are not {clip.length} frames"
                )
            present = getattr(sequence, "present", None)
            if present is not None:
                masks = masks & np.asarray(present, bool)[:, None, None]
            areas = masks.reshape(clip.length, -1).sum(1)
            i = self._groups.add(
                _Piece(
                    clip=k,
                    instance=int(getattr(sequence, "instance", position)),
                    label=int(sequence.label),
                    score=float(sequence.score),
                    area=int(areas.sum()),
                    frames={clip.start + t: encode_rle(masks[t]) for t in np.flatnonzero(areas)},
                )
            )
            here = masks[shared_before.start - clip.start : shared_before.stop - clip.start]
            for j, before in self._previous.items():
                if self._groups[j].label == self._groups[i].label and _same_track(before, here, self.iou_threshold):
                    self._groups.join(i, j)
            current[i] = masks[shared_after.start - clip.start : shared_after.stop - clip.start].copy()
        self._previous = current
        return self._pop_finished(lambda piece: piece.clip < k)

    def finish(self) -> list[Track]:
        """Every track still open: call once the last clip has been added."""
        return self._pop_finished(lambda piece: True)

    def _pop_finished(self, is_final) -> list[Track]:
        tracks = (self._track(pieces) for pieces in self._groups.pop_finished(is_final))
        return [track for track in tracks if track is not None]

    def _track(self, pieces: list[_Piece]) -> Track | None:
        """One track from its pieces: each frame's mask from the owning clip (the docstring's rule)."""
        by_frame: dict[int, dict[int, list[dict]]] = {}  # frame -> clip -> RLEs
        for piece in pieces:
            for frame, rle in piece.frames.items():
                by_frame.setdefault(frame, {}).setdefault(piece.clip, []).append(rle)
        if not by_frame:
            return None
        masks = {}
        for frame in sorted(by_frame):
            holders = by_frame[frame]
            owner = int(self._owners[frame])
            if owner not in holders:
                owner = min(holders, key=lambda c: (abs(frame - self.clips[c].centre), c))
            rles = holders[owner]
            rle = rles[0] if len(rles) == 1 else encode_rle(np.logical_or.reduce([decode_rle(r) for r in rles]))
            masks[self._number(frame)] = rle
        areas = np.array([p.area for p in pieces], np.float64)
        track = Track(
            video_id=self.video_id,
            track_id=self._next_track,
            label=pieces[0].label,
            score=float(np.dot(areas, [p.score for p in pieces]) / areas.sum()),
            first_frame=min(masks),
            last_frame=max(masks),
            masks=masks,
            pieces=sorted((p.clip, p.instance) for p in pieces),
        )
        self._next_track += 1
        return track

    def _number(self, position: int) -> int:
        return position if self._numbers is None else self._numbers[position]


def _same_track(before: np.ndarray, here: np.ndarray, iou_threshold: float) -> bool:
    """Masks F x H x W of two sequences over the frames both clips hold: spatio-temporal IoU."""
    inter = int(np.count_nonzero(before & here))
    return inter > 0 and inter / int(np.count_nonzero(before | here)) >= iou_threshold


def join_tracks(
    video_id: str,
    clips: Sequence[Clip],
    clip_sequences: Iterable[Iterable[InstanceSequenceLike]],
    iou_threshold: float = 0.5,
    frame_numbers: Sequence[int] | None = None,
) -> list[Track]:
    """Every track of a video from its clips' instance sequences, clip by clip in order."""
    joiner = TrackJoiner(video_id, clips, iou_threshold, frame_numbers)
    tracks: list[Track] = []
    for sequences in clip_sequences:
        tracks += joiner.add(sequences)
    return tracks + joiner.finish()
