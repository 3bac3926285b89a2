"""Every problem with a model name or a checkpoint is one short line, never a library's traceback.

Each test makes a small broken checkpoint (truncated, garbage, another variant's weights, a
config.json edited after save_pretrained, an mmseg tensor of another shape) and checks that
load_model raises a ModelError whose message is one line, short, and names the file and what
does not fit. The expected counts of keys that do not fit come from our own models' state
dicts, built with the architecture the broken file describes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import shutil

import numpy as np
import pytest
import torch
from helpers import (
    rel_error,
    saved_hf_model,
    tiny_hf_checkpoint,
    tiny_mask2former_config,
    tiny_maskformer_config,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import models
from models import (
    CheckpointError,
    ModelError,
    UnknownModelError,
    build_model,
    list_models,
    load_model,
    registry,
    save_native,
)
from models.base import FamilyContract, rename_keys
from models.mask2former import Mask2Former
from models.maskformer import MaskFormer
from models.registry import build_from_arch
from models.segformer import SegFormer

LIMIT = 500  # characters: a message longer than this is not "short"

SMALL_B0 = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_heads=[1, 2, 3, 4], decoder_dim=16)


def one_line(exc_info, *parts: str) -> str:
    """The message, after checking that it is one short line that contains every one of `parts`."""
    message = str(exc_info.value)
    assert "\n" not in message, message
    assert len(message) < LIMIT, (len(message), message)
    for part in parts:
        assert part in message, (part, message)
    return message


def misfit_counts(model: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(keys of another shape, missing, unexpected) of `weights` loaded into a model with state dict `model`."""
    wrong = sum(1 for k in model if k in weights and model[k].shape != weights[k].shape)
    return wrong, len(set(model) - set(weights)), len(set(weights) - set(model))


def assert_counts(message: str, counts: tuple[int, int, int]) -> None:
    wrong, missing, unexpected = counts
    assert wrong + missing + unexpected > 0
    assert f"{wrong} {'key' if wrong == 1 else 'keys'} of another shape" in message, message
    assert f"{missing} missing" in message, message
    assert f"{unexpected} unexpected" in message, message


@pytest.fixture(scope="module")
def native_b0(tmp_path_factory):
    """A small SegFormer-B0 (reduced widths, 3 classes) saved as a native checkpoint."""
    torch.manual_seed(0)
    model = build_model("segformer-b0", num_classes=3, **SMALL_B0)
    path = tmp_path_factory.mktemp("native") / "b0.safetensors"
    save_native(model, path)
    return path


# ---------------------------------------------------------------------------------------------
# Files that cannot be read
# ---------------------------------------------------------------------------------------------


def test_truncated_safetensors_is_one_line_checkpoint_error(native_b0, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    data = native_b0.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as exc_info:
        load_model(truncated)
    one_line(exc_info, str(truncated), "SafetensorError")


def test_garbage_pth_is_one_line_checkpoint_error(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a pickle, not a zip\n" * 50)
    with pytest.raises(CheckpointError) as exc_info:
        load_model(garbage, name="segformer-b0", num_classes=3)
    one_line(exc_info, str(garbage), "weights-only")


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_pth_with_pickled_code_names_the_refused_global_in_one_line(tmp_path):
    path = tmp_path / "code.pth"
    torch.save({"state_dict": {"x": _RunsCodeWhenUnpickled()}}, path)
    with pytest.raises(CheckpointError) as exc_info:
        load_model(path, name="segformer-b0", num_classes=3)
    message = one_line(exc_info, str(path), "UnpicklingError")
    assert "print" in message  # torch's telling line, not its paragraphs of advice


def test_config_json_that_is_not_json_is_one_line_checkpoint_error(hf_segformer, tmp_path):
    directory = tmp_path / "hf"
    shutil.copytree(hf_segformer, directory)
    (directory / "config.json").write_text('{"model_type": "segformer",')
    with pytest.raises(CheckpointError) as exc_info:
        load_model(directory)
    one_line(exc_info, str(directory / "config.json"), "JSONDecodeError")


def test_hf_dir_without_weights_is_one_line_checkpoint_error(hf_segformer, tmp_path):
    directory = tmp_path / "hf"
    directory.mkdir()
    shutil.copy(hf_segformer / "config.json", directory)
    with pytest.raises(CheckpointError) as exc_info:
        load_model(directory)
    one_line(exc_info, str(directory), "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Names and class counts
# ---------------------------------------------------------------------------------------------


def test_unknown_name_lists_known_names(native_b0):
    for call in (
        lambda: build_model("segformer-b9", num_classes=3),
        lambda: load_model(native_b0, name="segformer-b9"),
    ):
        with pytest.raises(UnknownModelError) as exc_info:
            call()
        message = str(exc_info.value)  # the list of names makes it long: one line is what counts
        assert "\n" not in message and "'segformer-b9'" in message
        assert ", ".join(list_models()) in message
    with pytest.raises(UnknownModelError, match="segformer, ") as exc_info:
        build_from_arch("segformer9", {})
    assert isinstance(exc_info.value, ModelError) and isinstance(exc_info.value, ValueError)


def test_num_classes_other_than_the_checkpoints_is_refused(native_b0):
    with pytest.raises(CheckpointError) as exc_info:
        load_model(native_b0, num_classes=5)
    assert str(exc_info.value) == f"model.num_classes is 5 but {native_b0} has 3 classes"
    assert load_model(native_b0, num_classes=3).num_classes == 3


def test_native_b0_under_the_name_of_another_variant_is_refused(native_b0):
    assert load_model(native_b0, name="segformer-b0").name == "segformer-b0"  # its own name loads
    with pytest.raises(CheckpointError) as exc_info:
        load_model(native_b0, name="segformer-b1")
    one_line(exc_info, str(native_b0), "not a segformer-b1 checkpoint", "it holds segformer-b0", "keys of another shape")
    with pytest.raises(CheckpointError) as exc_info:
        load_model(native_b0, name="setr-naive-vit-tiny")
    one_line(exc_info, str(native_b0), "not a setr-naive-vit-tiny checkpoint")


def test_hf_dir_under_the_name_of_another_variant_is_refused(hf_segformer):
    with pytest.raises(CheckpointError) as exc_info:
        load_model(hf_segformer, name="segformer-b1")
    one_line(exc_info, str(hf_segformer), "not a segformer-b1 checkpoint", "keys of another shape")


# ---------------------------------------------------------------------------------------------
# Checkpoints that do not fit, one per family
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_segformer(tmp_path_factory):
    path = tmp_path_factory.mktemp("segformer-hf")
    tiny_hf_checkpoint("segformer", path)
    return path


def test_an_hf_directorys_image_processor_sets_the_pixel_normalization_as_transformers_applies_it(tmp_path):
    """A fine-tune's preprocessor_config.json (what an image processor's save_pretrained writes) with
    statistics of its own: the loaded model normalizes pixels as transformers' SegformerImageProcessor
    does, its scores on them equal transformers' model on the processor's pixel_values, the statistics
    and do_reduce_labels survive a native conversion; do_normalize false is rescaling only; a
    processor file that cannot be meant is one line. Before: the family's ImageNet statistics, whatever
    the file said (a silently worse mask)."""
    import transformers

    directory = tmp_path / "hf"
    hf = tiny_hf_checkpoint("segformer", directory, perturb=True)
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    for settings in (
        dict(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3], do_reduce_labels=True),
        dict(do_normalize=False, rescale_factor=1 / 127.5),
    ):
        processor = transformers.SegformerImageProcessor(do_resize=False, **settings)
        processor.save_pretrained(directory)
        pixel_values = processor(images=image, return_tensors="pt").pixel_values
        model = load_model(directory)
        assert rel_error(model.normalize(pixels), pixel_values) < 1e-6, settings
        assert model.reduce_labels is settings.get("do_reduce_labels", False)
        with torch.no_grad():
            assert rel_error(model(model.normalize(pixels)), hf(pixel_values=pixel_values).logits) < 1e-4
        save_native(model, tmp_path / "native.safetensors")
        native = load_model(tmp_path / "native.safetensors")
        assert (native.pixel_mean, native.pixel_std, native.reduce_labels) == (model.pixel_mean, model.pixel_std, model.reduce_labels)
    assert model.pixel_mean == (0.0, 0.0, 0.0) and model.pixel_std == pytest.approx((127.5,) * 3)
    (directory / "preprocessor_config.json").write_text(json.dumps({"image_std": [0.2, 0, 0.3]}))
    with pytest.raises(CheckpointError) as exc_info:
        load_model(directory)
    one_line(exc_info, "preprocessor_config.json", "image_std must be positive")
    (directory / "preprocessor_config.json").write_text("{")
    with pytest.raises(CheckpointError) as exc_info:
        load_model(directory)
    one_line(exc_info, "preprocessor_config.json: not a JSON file")


def edited_copy(source, destination, edit) -> dict:
    """A copy of an HF checkpoint directory whose config.json went through `edit` (in place)."""
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    edit(config)
    (destination / "config.json").write_text(json.dumps(config))
    return config


def test_segformer_hf_dir_whose_config_does_not_fit_its_weights(hf_segformer, tmp_path):
    directory = tmp_path / "hf"
    edited_copy(hf_segformer, directory, lambda c: c.update(decoder_hidden_size=24))
    good = load_model(hf_segformer)
    expected = misfit_counts(SegFormer(**{**good.arch, "decoder_dim": 24}).state_dict(), good.state_dict())
    with pytest.raises(CheckpointError) as exc_info:
        load_model(directory)
    assert_counts(one_line(exc_info, str(directory), "config.json"), expected)


def test_segformer_hf_config_that_cannot_build_names_config_json(hf_segformer, tmp_path):
    directory = tmp_path / "hf"
    edited_copy(hf_segformer, directory, lambda c: c.update(num_attention_heads=[1, 2, 3, 5]))  # 32 wide, 5 heads
    with pytest.raises(CheckpointError) as exc_info:
        load_model(directory)
    one_line(exc_info, str(directory), "config.json", "cannot be built", "5 heads")


def test_segformer_native_checkpoint_of_another_width(native_b0, tmp_path):
    with safe_open(str(native_b0), framework="pt") as f:
        metadata = f.metadata()
    wider = build_model("segformer-b0", num_classes=3, **{**SMALL_B0, "hidden_sizes": [8, 16, 24, 40]})
    path = tmp_path / "wider.safetensors"
    save_file(wider.state_dict(), str(path), metadata=metadata)  # the weights of a wider model under b0's metadata
    expected = misfit_counts(load_model(native_b0).state_dict(), wider.state_dict())
    with pytest.raises(CheckpointError) as exc_info:
        load_model(path)
    assert_counts(one_line(exc_info, str(path)), expected)


# mmseg's names for our SETR-Naive keys (models/vit.py MMSEG_RULES, models/setr.py MMSEG_UP_HEAD_RULES)
_TO_MMSEG = [
    ("encoder.patch_embed.proj.", "backbone.patch_embed.projection."),
    ("encoder.blocks.", "backbone.layers."),
    ("encoder.", "backbone."),
    (".norm1.", ".ln1."),
    (".norm2.", ".ln2."),
    (".attn.qkv.", ".attn.attn.in_proj_"),
    (".attn.proj.", ".attn.attn.out_proj."),
    (".mlp.fc1.", ".ffn.layers.0.0."),
    (".mlp.fc2.", ".ffn.layers.1."),
    ("decoder.norm.", "decode_head.norm."),
    ("decoder.stages.", "decode_head.up_convs."),
    ("decode_head.up_convs.0.", "decode_head.up_convs.0.0."),
    ("decoder.classifier.", "decode_head.conv_seg."),
]


def to_mmseg(key: str) -> str:
    for ours, theirs in _TO_MMSEG:
        key = key.replace(ours, theirs)
    return key


def test_setr_mmseg_checkpoint_with_a_tensor_of_another_shape(tmp_path):
    torch.manual_seed(0)
    model = build_model("setr-naive-vit-tiny", num_classes=3, depth=2, pos_grid=(2, 2), channels=16)
    weights = {to_mmseg(k): v for k, v in model.state_dict().items()}
    path = tmp_path / "setr.pth"
    torch.save({"state_dict": weights}, path)
    assert load_model(path, name="setr-naive-vit-tiny", num_classes=3).encoder.config.depth == 2  # the layout is right
    fc2 = "backbone.layers.1.ffn.layers.1.weight"  # 192 x 768
    weights[fc2] = weights[fc2].reshape(384, 384)
    torch.save({"state_dict": weights}, path)
    with pytest.raises(CheckpointError) as exc_info:
        load_model(path, name="setr-naive-vit-tiny", num_classes=3)
    message = one_line(exc_info, str(path), "encoder.blocks.1.mlp.fc2.weight: checkpoint [384, 384] vs model [192, 768]")
    assert_counts(message, (1, 0, 0))


def test_segmenter_original_checkpoint_with_a_classifier_of_another_width(tmp_path):
    """rstrudel/segmenter's checkpoint.pth ({"model": encoder.*, decoder.*}) uses our key names, so
    our model's state dict is one; its linear classifier is swapped for one of a narrower encoder."""
    torch.manual_seed(0)
    model = build_model("segmenter-linear-vit-tiny", num_classes=3, depth=1, pos_grid=(2, 2))
    weights = dict(model.state_dict())
    weights["decoder.head.weight"] = torch.randn(3, 96)  # a linear head for a 96-wide encoder
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": weights, "epoch": 1}, path)
    with pytest.raises(CheckpointError) as exc_info:
        load_model(path, name="segmenter-linear-vit-tiny", num_classes=3)
    message = one_line(exc_info, str(path), "decoder.head.weight: checkpoint [3, 96] vs model [3, 192]")
    assert_counts(message, (1, 0, 0))


def test_maskformer_hf_dir_whose_config_does_not_fit_its_weights(tmp_path):
    from transformers import MaskFormerForInstanceSegmentation

    config = tiny_maskformer_config(num_labels=4, swin_depths=(1, 1, 1, 1))
    saved_hf_model(MaskFormerForInstanceSegmentation, config, tmp_path / "good", perturb=False)
    edited_copy(tmp_path / "good", tmp_path / "bad", lambda c: c["decoder_config"].update(decoder_ffn_dim=48))
    good = load_model(tmp_path / "good")
    expected = misfit_counts(MaskFormer(**{**good.arch, "ffn_dim": 48}).state_dict(), good.state_dict())
    with pytest.raises(CheckpointError) as exc_info:
        load_model(tmp_path / "bad")
    assert_counts(one_line(exc_info, str(tmp_path / "bad"), "config.json"), expected)


def test_mask2former_hf_dir_whose_config_does_not_fit_its_weights(tmp_path):
    from transformers import Mask2FormerForUniversalSegmentation

    config = tiny_mask2former_config(num_labels=4, swin_depths=(1, 1, 1, 1), encoder_layers=1, decoder_layers=3)
    saved_hf_model(Mask2FormerForUniversalSegmentation, config, tmp_path / "good", perturb=False)
    edited_copy(tmp_path / "good", tmp_path / "bad", lambda c: c.update(hidden_dim=48))  # over weights 32 wide
    good = load_model(tmp_path / "good")
    expected = misfit_counts(Mask2Former(**{**good.arch, "hidden_dim": 48}).state_dict(), good.state_dict())
    with pytest.raises(CheckpointError) as exc_info:
        load_model(tmp_path / "bad")
    assert_counts(one_line(exc_info, str(tmp_path / "bad"), "config.json"), expected)


# the weights of a saved tiny model of each query family with one tensor dropped: from_hf names the key
# the model misses (under our name); a config that asks for more, or for a backbone the family does
# not build, is refused too
HF_WEIGHTS_THAT_DO_NOT_FIT = [
    pytest.param("detr", "mask_head.lay4.weight", r"1 missing \(mask_head\.stages\.1\.refine\.conv\.weight\)", None, None, id="detr"),
    pytest.param(
        "mask2former",
        "model.transformer_module.decoder.layers.2.cross_attn.in_proj_weight",
        r"decoder_layers\.2\.cross_attn\.q_proj\.weight",
        lambda config: {**config, "decoder_layers": config["decoder_layers"] + 1},  # one decoder layer more than the weights
        "missing",
        id="mask2former",
    ),
    pytest.param(
        "maskformer",
        "model.transformer_module.decoder.layers.1.encoder_attn.q_proj.weight",
        r"decoder_layers\.1\.cross_attn\.q_proj\.weight",
        lambda config: {**config, "backbone_config": {"model_type": "resnet"}},
        "Swin",
        id="maskformer",
    ),
]


@pytest.mark.parametrize(("model_type", "dropped", "named", "edit_config", "config_refusal"), HF_WEIGHTS_THAT_DO_NOT_FIT)
def test_hf_weights_that_do_not_fit_the_family_name_the_missing_key(model_type, dropped, named, edit_config, config_refusal, tmp_path):
    tiny_hf_checkpoint(model_type, tmp_path)
    from_hf = importlib.import_module(f"models.{model_type}").from_hf
    config = json.loads((tmp_path / "config.json").read_text())
    state_dict = load_file(str(tmp_path / "model.safetensors"))
    del state_dict[dropped]
    with pytest.raises(CheckpointError, match=named):
        from_hf(config, state_dict, origin="ckpt")
    if edit_config is not None:
        with pytest.raises(CheckpointError, match=config_refusal):
            from_hf(edit_config(config), load_file(str(tmp_path / "model.safetensors")))


# ---------------------------------------------------------------------------------------------
# Each family's contract: the registry and the loaders' dispatch come from the family files
# ---------------------------------------------------------------------------------------------


def family_modules():
    """Every module of models/ that ends with a CONTRACT."""
    found = []
    for info in pkgutil.iter_modules(models.__path__):
        module = importlib.import_module(f"models.{info.name}")
        if isinstance(getattr(module, "CONTRACT", None), FamilyContract):
            found.append(module)
    return found


def test_registry_holds_every_family_files_contract_and_nothing_else():
    contracts = [module.CONTRACT for module in family_modules()]
    assert sorted(c.name for c in contracts) == sorted(registry.CONTRACTS)
    assert all(registry.CONTRACTS[c.name] is c for c in contracts)
    names = [name for c in contracts for name in c.variants]
    assert len(names) == len(set(names)), "a model name is declared by two families"
    assert sorted(names) == list_models()
    model_types = [t for c in contracts for t in c.hf_model_types]
    assert len(model_types) == len(set(model_types)), "an HF model_type is declared by two families"
    assert sorted(registry.HF_MODEL_TYPES) == sorted(model_types)
    for contract in contracts:
        assert all(registry.FAMILY_OF[name] is contract for name in contract.variants)
        assert all(registry.HF_MODEL_TYPES[t] is contract for t in contract.hf_model_types)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_name_builds_a_model_of_the_family_that_declares_it(name):
    contract = registry.FAMILY_OF[name]
    with torch.device("meta"):  # shapes only: the large variants cost nothing
        model = build_model(name, num_classes=3)
        rebuilt = build_from_arch(model.family, model.arch)  # as a native checkpoint is
    assert type(model) is contract.model and model.family == contract.name and model.name == name
    assert type(rebuilt) is contract.model and rebuilt.arch == model.arch


@pytest.mark.parametrize("model_type", sorted(registry.HF_MODEL_TYPES))
def test_a_save_pretrained_directory_loads_into_the_family_that_declares_its_model_type(model_type, tmp_path):
    tiny_hf_checkpoint(model_type, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    model = load_model(tmp_path)
    contract = registry.HF_MODEL_TYPES[model_type]
    assert type(model) is contract.model and model.family == contract.name


@pytest.mark.parametrize("name", list_models())
def test_an_mmseg_checkpoint_goes_to_from_mmseg_of_the_family_that_registers_its_name(name, tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    torch.save({"state_dict": {"decode_head.conv_seg.weight": torch.zeros(3, 4, 1, 1)}}, path)
    contract = registry.FAMILY_OF[name]
    if contract.from_mmseg is None:
        with pytest.raises(CheckpointError) as exc_info:
            load_model(path, name=name, num_classes=3)
        one_line(exc_info, str(path), f"no mmsegmentation layout is known for {name!r}")
        return
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        raise CheckpointError("reached the family's from_mmseg")

    monkeypatch.setitem(registry.FAMILY_OF, name, dataclasses.replace(contract, from_mmseg=spy))
    with pytest.raises(CheckpointError, match="reached the family's from_mmseg"):
        load_model(path, name=name, num_classes=3)
    [(args, kwargs)] = calls
    assert args[:2] == (name, 3) and kwargs == {"origin": str(path)}


def test_a_contract_with_from_hf_names_its_model_types():
    with pytest.raises(ValueError, match="hf_model_types and from_hf"):
        FamilyContract(model=SegFormer, variants={}, from_hf=lambda config, state_dict, origin="": None)
    with pytest.raises(ValueError, match="hf_model_types and from_hf"):
        FamilyContract(model=SegFormer, variants={}, hf_model_types=("segformer",))


# ---------------------------------------------------------------------------------------------
# rename_keys: the one key-renaming helper of every layout
# ---------------------------------------------------------------------------------------------


def test_rename_keys_uses_the_first_rule_that_matches_the_whole_key():
    rules = [
        (r"a\.(\d+)\.w", r"x.\1.weight"),
        (r"a\.(\d+)\.(.+)", r"y.\1.\2"),  # a.0.w matched the rule above first
        (r"layer_(\d+)\.b", lambda match: f"z.{int(match[1]) - 1}.bias"),  # 1-based -> 0-based
    ]
    state_dict = {"a.0.w": 1, "a.0.w.extra": 2, "layer_1.b": 3}
    assert rename_keys(state_dict, rules) == {"x.0.weight": 1, "y.0.w.extra": 2, "z.0.bias": 3}
    assert state_dict == {"a.0.w": 1, "a.0.w.extra": 2, "layer_1.b": 3}  # the input is left as it is


def test_rename_keys_refuses_uncovered_keys_in_one_line_unless_ignored_or_kept():
    rules = [(r"a\.w", "weight")]
    state_dict = {"a.w": 1, "head.w": 2, "other.w": 3}
    with pytest.raises(CheckpointError) as exc_info:
        rename_keys(state_dict, rules, origin="ckpt.pth", layout="Test")
    one_line(exc_info, "ckpt.pth: 2 keys of no known Test layout, e.g. head.w, other.w")
    assert rename_keys(state_dict, rules, ignored=[r"head\..*", r"other\.w"]) == {"weight": 1}
    assert rename_keys(state_dict, rules, ignored=[r"head\..*"], keep_unknown=True) == {"weight": 1, "other.w": 3}
