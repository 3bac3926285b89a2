"""A clip model's run, end to end, for the closing note: a written video, VisTR with random weights,
and what the run wrote (frames, clips, tracks, the first rows of the tracks table).

    .venv/bin/python benchmarks/clip_run_demo.py [--out /tmp/clip-demo] [--frames 24] [--full]

The video: `--frames` frames of 96 x 128 (FFV1, lossless) of a bright square moving right over a
dark background. The model: a small VisTR (TINY_VISTR's widths, 1 encoder and 1 decoder layer,
clips of 8 frames, 3 instances) saved as a native .safetensors, run with clip_length 8, clip_stride 4;
`--full`: vistr-r50 as the original repository builds it (36 frames of 10 instances, random weights,
clip_length 36, stride 18: minutes on a CPU). Random weights give random tracks: the run shows the
plumbing (units of clips, owned frames, the clips and tracks tables), not segmentation quality.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.cli import main
from models import build_model, save_native

SMALL = dict(stem_width=8, widths=[16, 32, 64, 128], ffn_dim=32, encoder_layers=1, decoder_layers=1, num_frames=8, num_instances=3)


def write_video(path: Path, frames: int, height: int = 96, width: int = 128) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.height, stream.width, stream.pix_fmt = height, width, "bgr0"
        for t in range(frames):
            pixels = np.full((height, width, 3), 30, np.uint8)
            x = 4 + 3 * t
            pixels[30:62, x : x + 32] = (230, 200, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main_demo() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/clip-demo")
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    write_video(out / "videos" / "square.mkv", args.frames)
    torch.manual_seed(0)
    arch, length, stride = ({}, 36, 18) if args.full else (SMALL, 8, 4)
    save_native(build_model("vistr-r50", num_classes=3, **arch), out / "vistr.safetensors")
    cfg = {
        "run_id": f"demo-{int(time.time())}",
        "input": {"uri": str(out / "videos"), "format": "video"},
        "model": {"checkpoint": str(out / "vistr.safetensors")},
        "inference": {"task": "instance", "clip_length": length, "clip_stride": stride},
        "resources": {"actors": 1},
        "output": {"uri": str(out / "runs")},
    }
    (out / "clips.yaml").write_text(yaml.safe_dump(cfg))
    started = time.time()
    code = main(["run", str(out / "clips.yaml")])
    print(f"segpipe run: exit {code} in {time.time() - started:.1f} s")
    run = out / "runs" / cfg["run_id"]
    summary = yaml.safe_load((run / "summary.json").read_text())
    print("summary.json video:", summary["video"])
    masks = pq.read_table(str(run / "masks")).column("image_id").to_pylist()
    clips = pq.read_table(str(run / "clips"))
    print(f"masks: {len(masks)} frames, each once: {len(set(masks)) == len(masks)}")
    print(f"clips table: {clips.num_rows} rows, clips {sorted(set(clips.column('clip').to_pylist()))}")
    tracks = pq.read_table(str(run / "tracks" / "tracks.parquet")).drop_columns(["rle"])
    print(f"tracks table: {tracks.num_rows} rows; the first 5 (rle left out):")
    print(tracks.slice(0, 5).to_pandas().to_string(index=False))


if __name__ == "__main__":
    main_demo()
