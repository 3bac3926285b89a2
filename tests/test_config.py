"""pipeline.config: the job's YAML validated once; overrides, defaults, errors that name the field,
credentials never shown."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import segpipe_run

from pipeline.config import ConfigError, load_config, public_config

BASE = {"input": {"uri": "/data"}, "model": {"name": "segformer-b0", "num_classes": 3}}


def test_set_overrides_are_read_as_yaml_and_run_id_defaults_to_a_timestamped_one():
    cfg = load_config(BASE, ["inference.window=[256, 128]", "inference.stride=[128,64]", "resources.actors=3", "run_id=abc"])
    assert cfg.inference.window == (256, 128)
    assert cfg.inference.stride == (128, 64)
    assert cfg.resources.actors == 3
    assert cfg.run_id == "abc"
    assert cfg.with_run_id().run_id == "abc"
    assert load_config(BASE).with_run_id().run_id.startswith("run-")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["inference.mode=tiles"], "inference.mode"),
        (["inference.batch_size=0"], "inference.batch_size"),
        (["inference.stride=[600,600]"], "inference"),
        (["resources.actorz=2"], "resources.actorz"),
        (["max_error_fraction=2"], "max_error_fraction"),
        (["run_id=a/b"], "run_id"),
        (["inference.backend=tensorrt"], "inference.backend"),
        (["inference.backend=onnxruntime", "inference.compile=true"], "backend onnxruntime"),
        (["inference.backend=onnxruntime", "inference.precision=bf16"], "backend onnxruntime"),
        (["inference.backend=onnxruntime", "resources.gpus_per_actor=1"], "CPU actors"),
        (["inference.clip_length=4", "inference.clip_stride=5"], "clip_stride 5 is larger than clip_length 4"),
        (["inference.clip_length=0"], "inference.clip_length: Input should be greater than or equal to 1"),
        (["inference.clip_stride=0"], "inference.clip_stride: Input should be greater than or equal to 1"),
        # windows that only touch would cut every object crossing their edge into pieces (each an instance)
        (["inference.task=instance", "inference.window=[48,48]", "inference.stride=[48,32]"], "stride [48, 32] must be below window"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, overrides)
    assert field in str(err.value)


@pytest.mark.parametrize(
    "actors, message",
    [
        (0, "resources.actors: Input should be greater than or equal to 1"),
        ({"min": 0, "max": 2}, "resources.actors.min: Input should be greater than or equal to 1"),
        ({"min": 3, "max": 2}, "resources.actors: max 2 is below min 3"),
        ({"min": 1}, "resources.actors.max: Field required"),
        ({"min": 1, "max": 2, "step": 1}, "resources.actors.step: unknown field"),
        ("4", "resources.actors: Input should be a valid integer"),
    ],
)
def test_resources_actors_is_a_number_or_min_max_bounds_and_bad_ones_name_the_field(actors, message):
    fixed = load_config(BASE, ["resources.actors=3"]).resources
    assert (fixed.actors, fixed.min_actors, fixed.max_actors, fixed.wait_for_gpus_s) == (3, 3, 3, 600)
    elastic = load_config(BASE, ["resources.actors={min: 1, max: 8}", "resources.wait_for_gpus_s=30"]).resources
    assert (elastic.min_actors, elastic.max_actors, elastic.wait_for_gpus_s) == (1, 8, 30)
    with pytest.raises(ConfigError) as err:
        load_config({**BASE, "resources": {"actors": actors}})
    assert str(err.value) == f"invalid config: {message}"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["inference.task=instance"], "output.confidence is for multi-class semantic runs: inference.task instance writes objects"),
        (["metrics.task=binary"], "output.confidence is for multi-class semantic runs: a binary task writes its foreground probability"),
    ],
)
def test_output_confidence_is_off_by_default_and_refused_where_no_class_probability_map_is_written(overrides, message):
    assert load_config(BASE).output.confidence is False
    assert load_config(BASE, ["output.confidence=true"]).output.confidence is True
    with pytest.raises(ConfigError, match=message):
        load_config(BASE, ["output.confidence=true", *overrides])


def test_model_needs_name_or_checkpoint():
    with pytest.raises(ConfigError, match="model"):
        load_config({"input": {"uri": "/x"}, "model": {}})


def test_storage_options_secrets_are_redacted():
    cfg = load_config(
        {
            **BASE,
            "input": {"uri": "s3://b/", "storage_options": {"key": "AKIA123", "secret": "s3cr3t", "endpoint_url": "http://127.0.0.1:9"}},
        }
    )
    text = str(public_config(cfg))
    assert "AKIA123" not in text and "s3cr3t" not in text
    assert "127.0.0.1:9" in text


def test_an_invalid_value_or_unknown_field_exits_2_naming_it_without_traceback(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input:\n  uri: /data\nmodel:\n  name: segformer-b0\ninference:\n  blend: median\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "inference.blend" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", str(path), "--set", "inference.blend=mean", "--set", "bogus=1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "bogus: unknown field" in proc.stderr


def test_a_tta_scale_that_is_not_positive_exits_2_naming_the_field(tmp_path, capsys):
    cfg = {"input": {"uri": str(tmp_path)}, "model": {"name": "segformer-b0"}, "inference": {"tta": {"scales": [1.0, -2]}}}
    capsys.readouterr()
    assert segpipe_run(tmp_path / "bad.yaml", cfg) == 2
    assert "inference.tta.scales" in capsys.readouterr().err


def test_relative_local_paths_are_made_absolute_in_the_driver_and_uris_stay(tmp_path, monkeypatch):
    """Ray's workers have the cwd of whoever started Ray, not segpipe's: `demo-out/runs` must mean
    the driver's folder there too."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        {"input": {"uri": "archive/images", "labels": {"uri": "archive/labels"}}, "model": {"checkpoint": "m.safetensors"},
         "output": {"uri": "s3://bucket/runs"}, "metrics": {"instance_labels": "coco.json"}, "inference": {"task": "instance"}}
    )  # fmt: skip
    assert cfg.input.uri == str(tmp_path / "archive" / "images") and cfg.input.labels.uri == str(tmp_path / "archive" / "labels")
    assert cfg.model.checkpoint == str(tmp_path / "m.safetensors") and cfg.metrics.instance_labels == str(tmp_path / "coco.json")
    assert cfg.output.uri == "s3://bucket/runs"


@pytest.mark.parametrize(
    "metrics, problem",
    [
        ({"task": "binary", "ignore_index": 255}, "255 is a foreground value of mask labels"),  # auto: 0/255 masks are read
        ({"task": "binary", "binary_labels": "mask", "ignore_index": 200}, "foreground value"),
        ({"task": "binary", "binary_labels": "mask", "ignore_index": 0}, "the background of mask labels"),
        ({"task": "binary", "binary_labels": "class_index", "ignore_index": 1}, "is metrics.positive_class"),
    ],
)
def test_a_binary_ignore_index_that_is_the_foreground_is_refused_naming_the_field(metrics, problem):
    with pytest.raises(ConfigError, match=f"metrics.ignore_index: .*{problem}"):
        load_config({**BASE, "metrics": metrics})


def test_binary_labels_default_to_auto_with_no_ignored_value_and_class_indices_keep_255():
    cfg = load_config({**BASE, "metrics": {"task": "binary"}})
    assert (cfg.metrics.binary_labels, cfg.metrics.ignore_index) == ("auto", None)
    # ignore_index 255 is what class-index labels mean by it, and a mask's ignored value may be 1-128
    assert load_config({**BASE, "metrics": {"task": "binary", "binary_labels": "class_index", "ignore_index": 255}})
    assert load_config({**BASE, "metrics": {"task": "binary", "binary_labels": "mask", "ignore_index": 128}})
    assert load_config({**BASE, "metrics": {"ignore_index": 255}}).metrics.ignore_index == 255


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"input": {"uri": "/x", "format": "slide", "slide": {"level": 1}}},
        {"input": {"uri": "/x", "format": "video", "video": {"fps": 2.5}}},
        {"input": {"uri": "/x", "format": "raster", "bands": [3, 2, 1], "scale": {"mode": "percentile", "low": 1, "high": 99}}},
        {"resources": {"actors": {"min": 1, "max": 3}}, "output": {"uri": "/runs", "confidence": True}},
    ],
)
def test_a_config_dumped_with_every_default_loads_again_as_the_same_config(extra):
    """Every section's defaults are dumped too (input.slide, resources, ...): a dump read back is the
    same config (the elastic-pool test rebuilt one so, and input.slide's defaults were refused)."""
    cfg = load_config({"input": {"uri": "/x"}, "model": {"name": "segformer-b0"}, "output": {"uri": "/runs"}, **extra})
    assert load_config(cfg.model_dump()).model_dump() == cfg.model_dump()


def test_video_sampling_is_every_n_or_fps_and_its_settings_need_format_video():
    video = {"uri": "/v", "format": "video"}
    cfg = load_config({**BASE, "input": video})
    assert (cfg.input.video.every_n, cfg.input.video.fps, cfg.input.lists_files) == (1, None, True)
    assert load_config({**BASE, "input": {**video, "video": {"every_n": 5}}}).input.video.every_n == 5
    assert load_config({**BASE, "input": {**video, "video": {"fps": 2.5}}}).input.video.fps == 2.5
    for bad, says in [
        ({"every_n": 0}, "input.video.every_n: Input should be greater than or equal to 1"),
        ({"fps": 0}, "input.video.fps: Input should be greater than 0"),
        ({"every_n": True}, "input.video.every_n: Input should be a valid integer"),
        ({"every_n": 2, "fps": 1.0}, "input.video: give every_n or fps, not both"),
        ({"fpz": 1}, "input.video.fpz: unknown field"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config({**BASE, "input": {**video, "video": bad}})
        assert str(err.value) == f"invalid config: {says}", bad
    with pytest.raises(
        ConfigError,
        match=r"^invalid config: input: Value error, video: these settings need format: video$|video: these settings need format: video",
    ):
        load_config({**BASE, "input": {"uri": "/data", "video": {"every_n": 2}}})
    with pytest.raises(ConfigError, match="labels.uri is needed for videos"):
        load_config({**BASE, "input": {**video, "labels": {"required": True}}})
