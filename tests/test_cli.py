"""jobs.cli, `segpipe`: its commands (models, convert) and its exit codes (README "Exit codes")."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import torch
from helpers import TINY_HF_SEGFORMER, job_config, saved_hf_model, segpipe_run, write_yaml

from jobs.cli import main
from models import load_model


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert {f"segformer-b{i}" for i in range(6)} <= set(names)


def test_convert_turns_an_hf_directory_into_a_native_checkpoint_with_the_same_outputs_and_classes_says_so_and_is_readable_like_any_new_file(
    tmp_path, capsys
):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(**{**TINY_HF_SEGFORMER, "id2label": {0: "a", 1: "b", 2: "c"}, "label2id": {"a": 0, "b": 1, "c": 2}})
    saved_hf_model(SegformerForSemanticSegmentation, config, tmp_path / "hf", perturb=False)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.safetensors")]) == 0
    assert (
        capsys.readouterr().out.strip()
        == f"{tmp_path / 'm.safetensors'}: segformer, 3 classes, {sum(p.numel() for p in load_model(tmp_path / 'hf').parameters()):,} parameters"
    )
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "m.safetensors").st_mode) == 0o666 & ~umask  # as any new file, not 0600
    a, b = load_model(tmp_path / "hf"), load_model(tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 50, 38)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert b.class_names == ["a", "b", "c"]


def test_an_unknown_command_and_an_unreadable_checkpoint_exit_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert main(["convert", "/nonexistent/dir", "/tmp/x.safetensors"]) == 2  # a checkpoint problem: usage


# the program's end (jobs.cli._exit_now): exit hooks run, output flushed, then os._exit; unless a
# thread of ours still runs, which Python's own exit then waits for
PROGRAM_END = """
import atexit, sys, threading, time
from jobs.cli import _exit_now
out = sys.argv[1]
atexit.register(lambda: open(out, "a").write("hook\\n"))
if sys.argv[2] == "thread":
    threading.Thread(target=lambda: (time.sleep(0.5), open(out, "a").write("thread\\n"))).start()
print("last line", end="")  # unflushed: a pipe is block-buffered
_exit_now(3)
open(out, "a").write("after\\n")
sys.exit(4)
"""


def test_the_program_ends_at_once_with_its_code_output_and_exit_hooks_unless_a_thread_of_ours_still_runs(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROGRAM_END, str(tmp_path / "alone"), "alone"], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (3, "last line")
    assert (tmp_path / "alone").read_text() == "hook\n"  # the hooks ran, nothing after _exit_now did
    waited = subprocess.run([sys.executable, "-c", PROGRAM_END, str(tmp_path / "thread"), "thread"], capture_output=True, text=True)
    assert (waited.returncode, waited.stdout) == (4, "last line")
    assert (tmp_path / "thread").read_text() == "after\nthread\nhook\n"  # Python's exit: the thread, then the hooks
    # started without a stdout (sys.stdout None): the same end, no traceback
    closed = subprocess.run(
        [sys.executable, "-c", PROGRAM_END, str(tmp_path / "closed"), "alone"], stdout=None, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: os.close(1),
    )  # fmt: skip
    assert (closed.returncode, closed.stderr, (tmp_path / "closed").read_text()) == (3, "", "hook\n")


def test_a_missing_input_uri_exits_2_with_one_line_naming_it_and_writes_nothing(tmp_path, checkpoint, capsys):
    cfg = job_config(tmp_path, tmp_path / "nowhere", checkpoint, run_id="none")
    capsys.readouterr()
    assert segpipe_run(tmp_path / "job.yaml", cfg) == 2  # found before the first image: usage, one line
    err = capsys.readouterr().err
    assert "input.uri" in err and "nowhere" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "none").exists()


def test_an_input_with_no_image_exits_2_before_ray_starts_and_writes_nothing(tmp_path, checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"not read: the pattern does not match it")
    cases = [
        (job_config(tmp_path, tmp_path / "empty", checkpoint, run_id="empty"), "'**/*'"),
        (job_config(tmp_path, tmp_path / "images", checkpoint, run_id="typo", input={"pattern": "**/*.png"}), "'**/*.png'"),
    ]
    for cfg, pattern in cases:
        capsys.readouterr()
        assert segpipe_run(tmp_path / "job.yaml", cfg) == 2
        err = capsys.readouterr().err
        assert err.startswith("segpipe: input.pattern: no file under") and pattern in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "runs").exists()


# as where s3fs is not installed: the first `import s3fs` (fsspec's, when it opens s3://) fails
WITHOUT_S3FS = "import sys; sys.modules['s3fs'] = None; from jobs.cli import main; sys.exit(main(sys.argv[1:]))"


def test_s3_without_s3fs_exits_2_with_one_line_for_a_run_and_an_export_and_writes_nothing(tmp_path, checkpoint):
    cfg = job_config(tmp_path, "s3://archive/images", checkpoint, run_id="s3")
    write_yaml(tmp_path / "job.yaml", cfg)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    for argv in (["run", str(tmp_path / "job.yaml")], ["export", str(tmp_path / "run"), "--to", "s3://results/x", "--format", "png"]):
        proc = subprocess.run([sys.executable, "-c", WITHOUT_S3FS, *argv], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"segpipe: {'s3://archive/images' if argv[0] == 'run' else 's3://results/x'}: the store's package is not installed (Install s3fs to access S3)"
        ]
    assert not (tmp_path / "runs").exists()


def test_s3fs_is_a_core_dependency_with_boto3_and_botocore_pinned_as_aiobotocore_needs():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    assert {"s3fs==2026.9.0", "boto3==1.43.117", "botocore==1.43.117"} <= set(project["dependencies"])


def test_a_run_stopped_by_a_signal_exits_as_a_shell_reports_it():
    import signal

    from jobs.cli import exit_interrupted

    assert (exit_interrupted(signal.SIGINT), exit_interrupted(signal.SIGTERM)) == (130, 143)


def test_convert_with_a_bad_option_value_is_one_line_and_exit_2(tmp_path, capsys):
    """`segpipe convert SRC DST --num-classes 0`: before, a pydantic traceback; now one line naming the field."""
    from helpers import tiny_checkpoint

    from jobs.cli import main

    source = tiny_checkpoint(tmp_path / "c.safetensors", 3)
    assert main(["convert", str(source), str(tmp_path / "out.safetensors"), "--num-classes", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_classes" in err and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()
