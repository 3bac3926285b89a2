"""The predict step of a clip model (VisTR): one clip in, one Prediction per frame the clip owns out.

    the clip's row (pipeline.io.source.read_clip: T frames stacked)
      -> frames scaled to the model's input (`model.input_size`: the original inference.py's
         T.Resize(300), bilinear and antialiased, on the 0-255 floats), normalized
      -> one forward for the clip -> models.vistr.instance_sequences at the frames' size
      -> per owned frame: its instance-id map (the masks table), its instances (the instances table)
      -> the clip's track pieces (the clips table, on the first owned frame's row)

Instances. A sequence's mask in a frame whose class score is under MIN_FRAME_SCORE is no mask
(inference.py writes None there); a sequence with no mask left in any frame is dropped. The rest are
the clip's instances, id = the model's instance slot + 1 (1..num_instances): the same id in every
frame of the clip, the clips table and the instances table. The instance-id map of a frame holds each
pixel's instance (0: none); where instances overlap, the higher score's (painted last). Scores are
the sequence's (the mean of its frames' best class probability, inference.py's), on every frame.
No score threshold: every sequence with a mask is kept, as inference.py writes them for YouTube-VIS.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from models.vistr import instance_sequences
from pipeline.io.coco_codec import encode_rle
from pipeline.io.video import split_frame_id
from pipeline.predict.tiling import label_dtype
from pipeline.rows import DecodedImage, Prediction


def clip_inputs(model, pixels: np.ndarray, frames: int, height: int, width: int) -> torch.Tensor:
    """(T * height) x width x 3 uint8 -> T x 3 x h x w floats on the 0-255 scale at `model.input_size`."""
    clip = torch.from_numpy(np.ascontiguousarray(pixels.reshape(frames, height, width, 3))).permute(0, 3, 1, 2).float()
    size = model.input_size(height, width)
    if tuple(size) == (height, width):
        return clip
    return F.interpolate(clip, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 255)


def bbox_of(mask: np.ndarray) -> list[float]:
    """COCO x, y, width, height of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def clip_predictions(
    image: DecodedImage,
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    num_instances: int,
    encode_mask,
) -> list[Prediction]:
    """The forward's outputs for a clip -> one Prediction per frame the clip owns (the module's
    docstring). encode_mask(id map, values) -> the mask's PNG chunks (pipeline.predict.predictor.finish_image)."""
    clip = image.clip
    ids, stamps, owned = clip["ids"], clip["timestamps"], clip["owned"]
    height, width = image.height, image.width
    sequences = []
    for seq in instance_sequences(class_logits, mask_logits, num_instances, size=(height, width)):
        masks = seq.masks & np.asarray(seq.present, bool)[:, None, None]
        if masks.any():
            sequences.append((seq.instance + 1, seq.label, float(seq.score), masks))
    painting = sorted(sequences, key=lambda s: (s[2], -s[0]))  # the higher score last: it wins a pixel
    dtype = label_dtype(num_instances + 1)
    out, pieces = [], None
    for t, image_id in enumerate(ids):
        if not owned[t]:
            continue
        row = Prediction(image.unit, image_id, height, width, timestamp_s=stamps[t])
        id_map = np.zeros((height, width), dtype)
        for instance, _, _, masks in painting:
            id_map[masks[t]] = instance
        row.chunks = encode_mask(id_map, num_instances + 1)
        row.objects = [
            {
                "instance_id": instance,
                "class_id": label,
                "score": score,
                "bbox": bbox_of(masks[t]),
                "area": int(masks[t].sum()),
                "height": height,
                "width": width,
                "rle": encode_rle(masks[t])["counts"],
            }
            for instance, label, score, masks in sequences
            if masks[t].any()
        ]
        if pieces is None:  # the clip's pieces of tracks travel once, with its first owned frame
            pieces = row.clip_rows = clip_rows(clip, sequences, height, width)
        out.append(row)
    return out


def clip_rows(clip: dict, sequences: list[tuple[int, int, float, np.ndarray]], height: int, width: int) -> list[dict]:
    """The clips table's rows of one clip (pipeline.results.run_tables.CLIPS_SCHEMA): each instance
    on every frame of the clip, owned or not (the frames shared with the next clip join its tracks);
    a clip without instances, one row of instance 0 (so that the table says which clips ran)."""
    frames = [split_frame_id(i)[1] for i in clip["ids"]]
    where = {k: clip[c] for k, c in (("video_id", "video"), ("clip", "index"), ("clip_start", "start"), ("clip_stop", "stop"))}
    where["video_frames"] = clip["video_frames"]
    if not sequences:  # the clip ran and found no instance: one row says so (instance 0, the rest null)
        return [{**where, "instance": 0, "class_id": None, "score": None, "frame": None, "height": height, "width": width, "rle": None}]
    return [
        {
            **where,
            "instance": instance,
            "class_id": label,
            "score": score,
            "frame": frame,
            "height": height,
            "width": width,
            "rle": encode_rle(masks[t])["counts"],
        }
        for instance, label, score, masks in sequences
        for t, frame in enumerate(frames)
    ]


def failed_frames(image: DecodedImage, stage: str, error: str) -> list[Prediction]:
    """Every frame the clip owns as an errors row (the clip failed as a whole)."""
    clip = image.clip
    return [
        Prediction(image.unit, image_id, image.height, image.width, timestamp_s=stamp).failed(stage, error)
        for image_id, stamp, own in zip(clip["ids"], clip["timestamps"], clip["owned"])
        if own
    ]
