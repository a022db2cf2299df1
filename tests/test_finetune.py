"""retfm finetune: it learns, resumes to the same result, adapts by LoRA without moving the backbone, and its
checkpoint predicts like the run did; label fractions and site filters choose the rows they say."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from retfm.adapt.config import FinetuneConfig
from retfm.adapt.finetune import finetune, predict
from retfm.data.manifest import Manifest
from retfm.data.splits import label_fraction_subset
from retfm.errors import RetfmError
from retfm.models import create, preprocessing, spec
from retfm.models.lora import add_lora


@pytest.fixture(scope="module")
def bright_or_dark(tmp_path_factory):
    """A task any learner should solve: class 1 images are brighter. Two sites, patient-level splits."""
    root = tmp_path_factory.mktemp("finetune")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(64):
        label = i % 2
        level = 150 if label else 70
        pixels = np.clip(rng.normal(level, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"im{i:03d}.png")
        patient = i // 2  # one image of each class per patient
        split = "test" if patient % 4 == 0 else "val" if patient % 8 == 1 else "train"
        rows.append({"image_id": f"im{i:03d}", "path": f"images/im{i:03d}.png", "site": f"site{1 + i // 32}",
                     "split": split, "patient_id": f"p{patient}", "sex": "F" if patient % 8 < 4 else "M", "finding": label})
    Manifest(pd.DataFrame(rows), root).write(root)
    return root


def _config(data, **overrides) -> FinetuneConfig:
    base = {"data": str(data), "model": "tiny-vit", "weights": "random", "label": "finding", "epochs": 4,
            "warmup_epochs": 1, "batch_size": 8, "blr": 0.05, "workers": 0, "bootstrap": 20, "randaugment": None,
            "random_erasing": 0.0, "label_smoothing": 0.0, "select_metric": "loss", "by": ["sex"]}
    return FinetuneConfig(**{**base, **overrides})


@pytest.mark.parametrize("adaptation", ["full", "linear", "lora"])
def test_each_adaptation_learns_and_its_checkpoint_predicts_like_the_run(bright_or_dark, tmp_path, adaptation):
    config = _config(bright_or_dark, adaptation=adaptation, epochs=6 if adaptation == "full" else 8,
                     blr=0.05 if adaptation == "full" else 0.5)
    result = finetune(config, tmp_path / "run")
    assert result["metrics"]["auroc"]["value"] >= 0.9, result["metrics"]["auroc"]
    assert set(result["groups"]["sex"]) == {"F", "M"}
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < log[0]["train_loss"]

    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["classes"] == ["0", "1"] and card["adaptation"] == adaptation and card["task"] == "binary"
    model = create(tmp_path / "run" / "model.safetensors", num_classes=2)
    test = Manifest.read(bright_or_dark).split("test").table
    pre = preprocessing(spec(tmp_path / "run" / "model.safetensors"))
    probabilities = predict(model, test, bright_or_dark, pre, config, torch.device("cpu"))
    predictions = pd.read_parquet(tmp_path / "run" / "predictions.parquet").set_index("image_id").loc[test["image_id"]]
    assert np.allclose(probabilities[:, 1], predictions["prob_1"], atol=1e-5)


def test_lora_and_linear_leave_the_backbone_as_it_was(bright_or_dark, tmp_path):
    torch.manual_seed(0)
    start = create("tiny-vit", weights="random")
    torch.save(start.state_dict(), tmp_path / "start.pt")
    for adaptation in ("linear", "lora"):
        finetune(_config(bright_or_dark, weights=str(tmp_path / "start.pt"), adaptation=adaptation, epochs=2),
                 tmp_path / adaptation)
        tuned = create(tmp_path / adaptation / "model.safetensors", num_classes=2).state_dict()
        moved = [k for k, v in start.state_dict().items() if not torch.equal(v, tuned[k])]
        if adaptation == "linear":
            assert moved == []
        else:  # LoRA merged into the attention projections it adapted, and nowhere else
            assert moved and all(".attn.qkv." in k for k in moved)


def test_the_imagenet_start_fine_tunes_with_lora_on_its_pointwise_convolutions(bright_or_dark, tmp_path):
    config = _config(bright_or_dark, model="efficientnet-lite0", weights=None, adaptation="lora", epochs=1,
                     image_size=64, lora_targets=["conv_pw", "conv_pwl"])
    finetune(config, tmp_path / "run")
    start, tuned = create("efficientnet-lite0").state_dict(), create(tmp_path / "run" / "model.safetensors").state_dict()
    assert tuned.keys() == start.keys()  # a plain model: the adapters merged in
    changed = {k for k in start if not torch.equal(start[k], tuned[k])}
    assert changed and all(".conv_pw" in k for k in changed)  # conv_pw and conv_pwl weights only


def test_a_lora_target_that_is_a_container_is_refused_in_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    with pytest.raises(RetfmError) as refused:
        add_lora(model, rank=2, alpha=2, dropout=0.0, targets=["1"])
    assert str(refused.value) == ("LoRA: targets 1 name a Sequential, which LoRA cannot adapt: name its Linear or "
                                  "Conv layers (e.g. qkv, proj)")


def test_an_interrupted_run_resumes_to_the_same_model(bright_or_dark, tmp_path):
    config = _config(bright_or_dark, epochs=3, randaugment="rand-m9-mstd0.5-inc1", random_erasing=0.25,
                     label_smoothing=0.1)
    finetune(config, tmp_path / "whole")

    class Crash(Exception):
        pass

    def crash_after_two(_):
        crash_after_two.epochs = getattr(crash_after_two, "epochs", 0) + 1
        if crash_after_two.epochs == 2:
            raise Crash

    with pytest.raises(Crash):
        finetune(config, tmp_path / "cut", progress=crash_after_two)
    with pytest.raises(RetfmError, match="--resume"):
        finetune(config, tmp_path / "cut")
    finetune(config, tmp_path / "cut", resume=True)
    whole = pd.read_parquet(tmp_path / "whole" / "predictions.parquet")
    cut = pd.read_parquet(tmp_path / "cut" / "predictions.parquet")
    assert np.array_equal(whole["prob_1"], cut["prob_1"])
    assert (tmp_path / "whole" / "log.jsonl").read_text() == (tmp_path / "cut" / "log.jsonl").read_text()


def test_sites_choose_training_and_test_rows(bright_or_dark, tmp_path):
    result = finetune(_config(bright_or_dark, epochs=1, train_sites=["site1"], test_sites=["site2"]), tmp_path / "x")
    predictions = pd.read_parquet(tmp_path / "x" / "predictions.parquet")
    assert set(predictions["site"]) == {"site2"} and len(predictions) == 8
    assert result["meta"]["train_rows"] == 20 and result["meta"]["selection_rows"] == 4
    with pytest.raises(RetfmError, match="no site"):
        finetune(_config(bright_or_dark, train_sites=["elsewhere"]), tmp_path / "y")
    with pytest.raises(RetfmError, match="no label column"):
        finetune(_config(bright_or_dark, label="dr_grade"), tmp_path / "z")


def test_label_fractions_keep_patients_whole_stratified_and_nested():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(100), 2)
    labels = np.repeat(rng.integers(0, 3, 100), 2)
    table = pd.DataFrame({"image_id": [f"i{i}" for i in range(200)], "patient_id": [f"p{p}" for p in patients],
                          "grade": labels})
    kept = {f: label_fraction_subset(table, "grade", f, seed=0) for f in (0.1, 0.3, 1.0)}
    assert len(kept[1.0]) == 200
    for fraction in (0.1, 0.3):
        chosen = kept[fraction]
        assert chosen.groupby("patient_id").size().eq(2).all()  # a patient's images stay together
        per_label = chosen.drop_duplicates("patient_id")["grade"].value_counts()
        total = table.drop_duplicates("patient_id")["grade"].value_counts()
        assert ((per_label - fraction * total).abs() <= 0.5 + 1e-9).all()  # stratified to within rounding
    assert set(kept[0.1]["image_id"]) <= set(kept[0.3]["image_id"])  # nested
    assert not label_fraction_subset(table, "grade", 0.3, seed=1).equals(kept[0.3])
