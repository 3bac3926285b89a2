"""Clip windows in time: the plan, which clip owns a frame, and instance sequences joined into tracks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.io.coco_codec import decode_rle
from pipeline.predict.clips import Clip, TrackJoiner, frame_owners, join_tracks, plan_clips

SIZE = (24, 40)


@dataclass
class Sequence:
    """An instance sequence as a clip model gives it (models.vistr.InstanceSequence's fields)."""

    label: int
    score: float
    masks: np.ndarray
    present: np.ndarray | None = None


def square(frame: int, start: tuple[int, int], velocity: tuple[int, int], side: int = 6) -> np.ndarray:
    mask = np.zeros(SIZE, bool)
    y, x = start[0] + velocity[0] * frame, start[1] + velocity[1] * frame
    mask[max(y, 0) : max(y + side, 0), max(x, 0) : max(x + side, 0)] = True
    return mask


def sequences_of(clip: Clip, objects: list[tuple[int, tuple[int, int], tuple[int, int]]], order: list[int] | None = None) -> list[Sequence]:
    """The clip's sequences of `objects` (label, start, velocity), in slot `order`."""
    order = order if order is not None else list(range(len(objects)))
    return [
        Sequence(objects[i][0], 0.9, np.stack([square(f, objects[i][1], objects[i][2]) for f in range(clip.start, clip.stop)]))
        for i in order
    ]


def test_clips_every_stride_the_last_one_ending_at_the_last_frame():
    assert [(c.start, c.stop) for c in plan_clips(100, 36, 18)] == [(0, 36), (18, 54), (36, 72), (54, 90), (64, 100)]
    assert [(c.start, c.stop) for c in plan_clips(54, 36, 18)] == [(0, 36), (18, 54)]
    assert plan_clips(36, 36, 18) == [Clip(0, 36)]
    assert plan_clips(10, 36, 18) == [Clip(0, 10)]  # shorter than a clip: one short clip, the model fills it
    assert plan_clips(0, 36, 18) == []
    assert [(c.start, c.stop) for c in plan_clips(10, 4, 4)] == [(0, 4), (4, 8), (6, 10)]
    with pytest.raises(ValueError, match="clip_stride 5 is larger than clip_length 4"):
        plan_clips(10, 4, 5)


def test_a_frame_where_clips_overlap_belongs_to_the_clip_whose_centre_is_nearest():
    clips = plan_clips(54, 36, 18)  # centres 17.5 and 35.5: the overlap 18..35 splits at 26 | 27
    owners = frame_owners(clips)
    assert owners.tolist() == [0] * 27 + [1] * 27
    # the last clip pulled back: (64, 100) overlaps (54, 90) on 64..89; centres 71.5 and 81.5 -> 76 | 77
    owners = frame_owners(plan_clips(100, 36, 18))
    assert owners[76] == 3 and owners[77] == 4 and owners[99] == 4
    assert frame_owners([Clip(0, 4), Clip(2, 6)]).tolist() == [0, 0, 0, 1, 1, 1]
    assert frame_owners([Clip(0, 4), Clip(1, 3)]).tolist() == [0, 0, 0, 0]  # the same centre: the earlier clip wins each tie


def test_a_square_moving_across_clip_boundaries_is_one_track():
    clips = plan_clips(20, 8, 4)  # five clips, each frame in two
    square_object = [(3, (2, 0), (0, 1))]  # a square moving right one pixel a frame
    tracks = join_tracks("video.mp4", clips, [sequences_of(c, square_object) for c in clips])
    assert len(tracks) == 1
    [track] = tracks
    assert (track.video_id, track.track_id, track.label, track.first_frame, track.last_frame) == ("video.mp4", 1, 3, 0, 19)
    assert track.score == pytest.approx(0.9)
    assert sorted(track.masks) == list(range(20))
    assert track.pieces == [(k, 0) for k in range(len(clips))]  # (clip, the sequence's instance or position): each clip's one
    for frame, rle in track.masks.items():
        assert np.array_equal(decode_rle(rle), square(frame, (2, 0), (0, 1)))


def test_two_squares_crossing_are_two_tracks_whatever_the_slots():
    clips = plan_clips(16, 8, 4)
    objects = [(1, (4, 0), (0, 2)), (1, (7, 30), (0, -2))]  # one class; they overlap as they cross, frames 6..8
    # the model's slots need not keep their order from clip to clip
    per_clip = [sequences_of(c, objects, order=[k % 2, 1 - k % 2]) for k, c in enumerate(clips)]
    tracks = join_tracks("v", clips, per_clip)
    assert len(tracks) == 2
    for track in tracks:
        start, velocity = (objects[0] if decode_rle(track.masks[0])[4, 0] else objects[1])[1:]
        assert sorted(track.masks) == list(range(16))
        assert all(np.array_equal(decode_rle(rle), square(f, start, velocity)) for f, rle in track.masks.items())
    assert sorted(t.track_id for t in tracks) == [1, 2]


def test_sequences_of_different_classes_are_not_joined():
    clips = plan_clips(12, 8, 4)
    first = sequences_of(clips[0], [(1, (2, 0), (0, 1))])
    second = sequences_of(clips[1], [(2, (2, 0), (0, 1))])  # the same square, named another class
    tracks = join_tracks("v", clips, [first, second])
    assert sorted((t.label, t.first_frame, t.last_frame) for t in tracks) == [(1, 0, 7), (2, 4, 11)]
    # the overlap 4..7: clip 0's centre 3.5, clip 1's 7.5 -> frames 4, 5 are clip 0's; each track keeps
    # its own clip's masks where the other clip does not hold it
    by_label = {t.label: t for t in tracks}
    assert sorted(by_label[1].masks) == list(range(8)) and sorted(by_label[2].masks) == list(range(4, 12))


def test_a_track_takes_each_frames_mask_from_the_owning_clip():
    clips = plan_clips(12, 8, 4)  # overlap 4..7, frames 4, 5 clip 0's, 6, 7 clip 1's
    truth = [(1, (2, 0), (0, 1))]
    first = sequences_of(clips[0], truth)
    second = sequences_of(clips[1], truth)
    second[0].masks[:, :, :] |= square(0, (14, 30), (0, 0))[None]  # clip 1 adds a blob: IoU on 4..7 still >= 0.5
    joiner = TrackJoiner("v", clips, frame_numbers=[10 * f for f in range(12)])
    assert joiner.add(first) == []
    [track] = joiner.add(second) + joiner.finish()
    blob = square(0, (14, 30), (0, 0))
    for frame in range(12):
        expected = square(frame, (2, 0), (0, 1)) | (blob if frame >= 6 else False)
        assert np.array_equal(decode_rle(track.masks[10 * frame]), expected), frame
    assert (track.first_frame, track.last_frame) == (0, 110)


def test_absent_frames_and_empty_sequences_make_no_mask_and_no_track():
    clips = [Clip(0, 4)]
    masks = np.stack([square(f, (2, 2), (0, 0)) for f in range(4)])
    sequences = [
        Sequence(1, 0.5, masks, present=np.array([True, False, True, True])),
        Sequence(2, 0.5, np.zeros((4, *SIZE), bool)),
    ]
    [track] = join_tracks("v", clips, [sequences])
    assert sorted(track.masks) == [0, 2, 3] and track.label == 1
