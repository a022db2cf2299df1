"""Image-text pretraining, zero-shot recognition and text-to-image search, end to end on a task a small model
can learn in seconds: glaucoma images are brighter, and each image's text is composed from its label."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from retfm.data.manifest import Manifest
from retfm.errors import RetfmError
from retfm.pretrain.clip import CLIP, CLIP_WEIGHTS, load_clip
from retfm.pretrain.config import PretrainConfig
from retfm.pretrain.trainer import pretrain
from retfm.zeroshot.classify import class_texts, top_k_accuracy, zeroshot
from retfm.zeroshot.config import ZeroshotConfig

TINY_TEXT = {"embed_dim": 32, "text": {"width": 64, "heads": 2, "layers": 2, "context_length": 48}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    (root / "data" / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(96):
        glaucoma = i % 3 == 0
        pixels = np.clip(rng.normal(160 if glaucoma else 60, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "data" / "images" / f"im{i}.png")
        rows.append({"image_id": f"im{i}", "path": f"images/im{i}.png", "site": "a",
                     "split": "test" if i % 4 == 0 else "train", "glaucoma": int(glaucoma)})
    Manifest(pd.DataFrame(rows), root / "data").write(root / "data")
    config = PretrainConfig(objective="clip", data=[str(root / "data")], model="tiny-vit", steps=60, batch_size=16,
                            workers=0, blr=0.01, warmup_steps=5, log_every=5, objective_options=TINY_TEXT)
    card = pretrain(config, root / "run")
    return root, card


def test_the_contrastive_loss_falls_and_the_export_holds_the_trained_image_tower(trained):
    root, card = trained
    losses = [json.loads(line)["loss"] for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    # chance is ln(16) = 2.77; with two labels and texts that differ only in wording, the floor is ~2.2
    assert np.mean(losses[-4:]) < losses[0] - 0.1
    assert card["objective"] == "clip" and card["images_seen"] == 960
    backbone, full = load_file(root / "run" / "model.safetensors"), load_file(root / "run" / CLIP_WEIGHTS)
    assert all(torch.equal(tensor, full[f"backbone.{name}"]) for name, tensor in backbone.items())
    model, clip_card = load_clip(root / "run")
    assert clip_card["tokenizer"] == "ViT-B-32" and model.embed_dim == 32


def test_zero_shot_recognises_the_label_from_its_description(trained, tmp_path):
    root, _ = trained
    result = zeroshot(root / "data", root / "run", tmp_path / "zs", ZeroshotConfig(label="glaucoma", bootstrap=50))
    assert result["n"] == 24 and result["top_k"]["top1_accuracy"] >= 0.9, result["top_k"]
    assert result["metrics"]["auroc"]["value"] >= 0.95
    assert result["meta"]["prompts_per_class"]["1"] > 10  # templates x synonyms x signs
    predictions = pd.read_parquet(tmp_path / "zs" / "predictions.parquet")
    assert np.allclose(predictions[["prob_0", "prob_1"]].sum(axis=1), 1)
    # the classes named by hand in the other order are read as such: every prediction flips
    flipped = zeroshot(root / "data", root / "run", tmp_path / "flip",
                       ZeroshotConfig(label="glaucoma", bootstrap=0, classes="0=glaucoma,1=normal fundus"))
    assert flipped["top_k"]["top1_accuracy"] <= 0.1


def test_text_finds_the_images_it_describes(trained, tmp_path):
    root, _ = trained
    zeroshot(root / "data", root / "run", tmp_path / "zs", ZeroshotConfig(label="glaucoma", bootstrap=0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "retfm.cli.main"]
    subprocess.run([*cli, "index", "build", "--embeddings", str(tmp_path / "zs" / "image_embeddings.parquet"),
                    "--out", str(tmp_path / "index")], check=True, env=env, capture_output=True)
    run = subprocess.run([*cli, "retrieve", "--index", str(tmp_path / "index"), "--text", "optic disc cupping",
                          "--k", "5", "--out", str(tmp_path / "hits.csv")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    hits = pd.read_csv(tmp_path / "hits.csv")
    assert len(hits) == 5 and (hits["glaucoma"] == 1).all()


def test_classes_can_be_named_and_must_be_complete():
    assert class_texts("glaucoma", [0, 1], "normal fundus,glaucoma", "cfp")[1][0].count("glaucoma")
    named = class_texts("status", ["a", "b"], "b=glaucoma,a=normal fundus", "cfp")
    assert "glaucoma" in named["b"][0] and "normal" in named["a"][0]
    with pytest.raises(RetfmError, match="one per value"):
        class_texts("glaucoma", [0, 1], "glaucoma", "cfp")
    with pytest.raises(RetfmError, match="no condition named for value"):
        class_texts("glaucoma", [0, 1], "1=glaucoma", "cfp")
    with pytest.raises(RetfmError, match="--classes"):
        class_texts("status", ["a", "b"], None, "cfp")


def test_top_k_accuracy_counts_the_true_class_among_the_k_most_probable():
    probabilities = np.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    assert top_k_accuracy(np.array([1, 0, 3]), probabilities, (1, 3, 5)) == {"top1_accuracy": 0.0,
                                                                            "top3_accuracy": 1 / 3}


def _tiny_clip(loss: str, label_aware: bool = True) -> CLIP:
    from retfm.models import create

    return CLIP(create("tiny-vit", weights="random"), loss=loss, label_aware=label_aware, **TINY_TEXT)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_with_every_text_different_the_loss_is_open_clips_own(loss):
    from open_clip.loss import ClipLoss, SigLipLoss

    torch.manual_seed(0)
    model = _tiny_clip(loss)
    images, tokens = torch.randn(6, 3, 64, 64), torch.randint(1, 400, (6, 48))
    ours = model(images, tokens, torch.arange(6))["loss"]
    image, text = model.encode_image(images), model.encode_text(tokens)
    scale = model.logit_scale.exp()
    reference = SigLipLoss()(image, text, scale, model.logit_bias) if loss == "siglip" else ClipLoss()(image, text, scale)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(_tiny_clip(loss, label_aware=False).load_state_dict(model.state_dict()) and
                          model(images, tokens)["loss"], reference, atol=1e-5)


def test_texts_that_say_the_same_are_positives_not_negatives():
    """Two groups of texts that say the same. Pairwise CLIP loss prefers every image on its own text, apart from its
    look-alikes; label-aware loss prefers each group on one point, where it reaches its floor (the mean log of the
    number of positives)."""
    model = _tiny_clip("clip")
    keys = torch.tensor([7, 7, 7, 9, 9, 9, 9, 9])
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))
    apart = torch.eye(8, 32)  # every image on its own text
    together = torch.nn.functional.normalize(torch.eye(2, 32)[(keys == 9).long()], dim=-1)
    losses = {}
    for label_aware in (True, False):
        model.label_aware = label_aware
        for name, features in (("apart", apart), ("together", together)):
            model.encode_image = model.encode_text = lambda _, f=features: f
            losses[label_aware, name] = model(torch.zeros(8, 1), torch.zeros(8, 1), keys)["loss"].item()
    floor = (3 * np.log(3) + 5 * np.log(5)) / 8
    assert losses[True, "together"] == pytest.approx(floor, abs=1e-3) and losses[True, "apart"] > floor + 0.5
    assert losses[False, "apart"] < 0.01 < floor - 0.5 < losses[False, "together"]


def test_a_caption_key_is_what_the_text_says_not_its_wording():
    from retfm.pretrain.clip import Captions

    table = pd.DataFrame({"dr_grade": [2, 2, 0, 0, None], "glaucoma": [1, 1, 0, 1, None],
                          "text": [None, None, None, None, "Optic disc  CUPPING"]})
    captions = Captions(table, tokenizer=None, seed=0, where="test")
    assert captions.text(0, epoch=0) != captions.text(1, epoch=3)  # worded differently ...
    assert captions.key(0) == captions.key(1)  # ... but the same conditions
    assert len({captions.key(i) for i in (0, 2, 3)}) == 3
    assert captions.key(4) == Captions(table.assign(text=[None] * 4 + ["optic disc cupping"]), None, 0, "t").key(4)


def test_a_convolutional_model_is_an_image_tower_but_not_a_masked_autoencoder(tmp_path):
    from retfm.pretrain.trainer import build_model

    for model, init in (("cnn-demo", None), ("efficientnet-lite0", "published")):  # the ImageNet start too
        _, objective = build_model(PretrainConfig(objective="clip", data=["unused"], model=model, init=init,
                                                  image_size=64, objective_options=TINY_TEXT))
        assert objective(torch.randn(4, 3, 64, 64), torch.randint(1, 400, (4, 48)))["loss"].isfinite()
    with pytest.raises(RetfmError, match="needs a ViT"):
        build_model(PretrainConfig(objective="mae", data=["unused"], model="cnn-demo"))


def test_a_lora_tuned_image_tower_trains_its_adapters_and_is_saved_merged(trained, tmp_path):
    from retfm.pretrain.trainer import build_model

    root, _ = trained
    config = PretrainConfig(objective="clip", data=[str(root / "data")], model="tiny-vit", steps=3, batch_size=16,
                            workers=0, blr=0.01, warmup_steps=1, objective_options=TINY_TEXT,
                            lora={"rank": 4, "targets": ["qkv"]})
    pretrain(config, tmp_path / "run")
    torch.manual_seed(config.seed)
    _, initial = build_model(config.model_copy(update={"lora": None}))
    start, saved = initial.backbone.state_dict(), load_file(tmp_path / "run" / "model.safetensors")
    assert saved.keys() == start.keys()  # a plain model: the adapters are merged in
    frozen = [k for k in start if ".qkv." not in k]
    assert all(torch.equal(saved[k], start[k]) for k in frozen)
    assert not torch.equal(saved["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    model, _ = load_clip(tmp_path / "run")  # the whole image-text model loads with the merged tower
    assert all(torch.equal(model.backbone.state_dict()[k], saved[k]) for k in saved)
