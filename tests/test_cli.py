import subprocess
import sys

import torch

from jobs.cli import main
from models import load_model


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert {f"segformer-b{i}" for i in range(6)} <= set(names)


def test_convert_hf_directory_to_native(tmp_path, capsys):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    config = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2],
                             decoder_hidden_size=16, num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    SegformerForSemanticSegmentation(config).eval().save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.safetensors")]) == 0
    assert "3 classes" in capsys.readouterr().out
    a, b = load_model(tmp_path / "hf"), load_model(tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 50, 38)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert b.class_names == ["a", "b", "c"]


def test_bad_usage_exits_2():
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert main(["convert", "/nonexistent/dir", "/tmp/x.safetensors"]) == 2  # a checkpoint problem: usage
