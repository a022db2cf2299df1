"""Federated fine-tuning: a site's local fine-tuning learns and sends only what its adaptation trains, the global
classifier is tested at each site without being refitted there, LoRA + fp16 + DP runs through the real ClientApp
and coordinator, and one simulated run ends in a classifier checkpoint that retfm's loader and predict path read."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

from retfm.adapt.finetune import predict
from retfm.config import load_config
from retfm.errors import RetfmError
from retfm.federated.config import FederatedConfig
from retfm.federated.simulation import finish, resolve_sites, simulate
from retfm.federated.task import local_finetune, local_test, seeded_classifier, start_weights
from retfm.models import create, preprocessing, spec
from retfm.serve.config import ServeConfig
from retfm.serve.screening import Screener
from tests.test_federated import assert_one_line_config_errors, METRIC_KEYS, assert_only_weights_and_aggregates, cohort, task_identity  # noqa: F401
from tests.test_federated_privacy import coordinate_in_process

FINETUNE = {"model": "tiny-vit", "weights": "random", "label": "glaucoma", "classes": [0, 1], "batch_size": 4,
            "workers": 0, "blr": 0.05, "randaugment": None, "random_erasing": 0.0, "label_smoothing": 0.0}
TWO_SITES = ["site2", "site3"]  # both hold each class in their test split, so AUROC is defined at each


def _config(cohort, adaptation="full", classes=(0, 1), **options) -> FederatedConfig:
    sites = [{"name": name, "data": str(cohort), "rows": name} for name in TWO_SITES]
    return FederatedConfig(sites=sites, task="finetune",
                           finetune={**FINETUNE, "adaptation": adaptation, "classes": list(classes)},
                           **{"rounds": 2, "local_steps": 2, "evaluate_label": "glaucoma", **options})


def test_local_finetuning_lowers_the_loss_and_sends_what_its_adaptation_trains(cohort):
    config = _config(cohort)
    site = resolve_sites(config)[0]
    finetune, classes = config.finetune_config(), config.classes()
    start = start_weights(config)
    assert set(start) == {name for name, _ in seeded_classifier(finetune, classes)[2].named_parameters()}
    new, metrics = local_finetune(start, site, 4, finetune, classes=classes)
    assert new.keys() == start.keys() and metrics["num-examples"] == 16 and metrics["steps"] == 4
    # the same round's batches again, from the trained weights: the loss is lower
    _, again = local_finetune(new, site, 4, finetune, classes=classes)
    assert again["loss"] < metrics["loss"] - 0.02, (metrics, again)
    evaluation = local_test(new, site, "glaucoma", finetune, classes=classes)
    assert set(evaluation) <= METRIC_KEYS and evaluation["num-examples"] == 6 and "auroc" in evaluation

    linear = _config(cohort, "linear")
    head = start_weights(linear)
    assert set(head) == {"head.weight", "head.bias"}  # the backbone stays as every site built it
    moved, _ = local_finetune(head, site, 2, linear.finetune_config(), classes=classes)
    assert moved.keys() == head.keys() and not torch.equal(moved["head.weight"], head["head.weight"])


def test_a_site_missing_a_class_still_trains_and_a_foreign_class_is_an_error(cohort):
    config = _config(cohort, "linear", classes=(0, 1, 7))
    site = resolve_sites(config)[0]
    new, metrics = local_finetune(start_weights(config), site, 2, config.finetune_config(), classes=config.classes())
    assert tuple(new["head.weight"].shape)[0] == 3 and metrics["steps"] == 2
    with pytest.raises(RetfmError, match=r"site site2: label column 'glaucoma' has value '1', which is not among"):
        local_finetune(start_weights(_config(cohort, "linear")), site, 2, config.finetune_config(), classes=["0", "7"])


def test_finetune_config_errors_are_one_line(cohort, tmp_path):
    path = tmp_path / "federated.yaml"
    path.write_text(json.dumps({"data": str(cohort), "task": "finetune", "finetune": FINETUNE}))
    assert load_config(FederatedConfig, path).classes() == ["0", "1"]
    problems = [(["finetune.classes=[0]"], "finetune.classes: the label's values"),
                (["finetune.data=x"], "finetune.data: the data come from the federation's sites"),
                (["finetune.epochs=0"], "finetune.epochs"),
                (["transfer_params=lora"], "set finetune.adaptation: lora"),
                (["evaluate_label=dr_grade"], "the classifier predicts 'glaucoma'"),
                (["task=pretrain"], "task pretrain: give pretrain options, not finetune")]
    assert_one_line_config_errors(path, problems)


def test_a_lora_fp16_dp_finetuning_sends_adapters_and_head_and_merges_them_at_the_end(cohort, tmp_path):
    config = _config(cohort, "lora", transfer="fp16", dp={"clip_norm": 0.5, "noise_multiplier": 1.0})
    start = start_weights(config)
    assert all(".lora_" in k or ".head.modules_to_save." in k for k in start)
    saved, _, train = coordinate_in_process(config, tmp_path)
    assert len(train) == 2 * 2 * 2  # rounds x (sent + received) x sites
    assert all(keys == list(start) and dtypes == {"float16" if direction == "received" else "float32"}
               for direction, keys, dtypes in train)
    assert [entry["aggregated_sites"] for entry in saved["history"]] == [2, 2]
    assert set(saved["history"][-1]["evaluate"]) == set(TWO_SITES) and saved["history"][-1]["privacy"]["epsilon"] > 0

    report = finish(config, TWO_SITES, tmp_path)
    assert report["task"] == "finetune" and report["dp"]["releases"] == 2
    merged = create(tmp_path / "model.safetensors", num_classes=2).state_dict()
    base = seeded_classifier(config.finetune_config(), config.classes())[2].merge_and_unload().state_dict()
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight", "head.weight", "head.bias"}


def test_a_simulated_finetuning_run_writes_a_classifier_that_predicts_as_the_sites_reported(cohort, tmp_path):
    config = _config(cohort)
    messages = []
    report = simulate(config, tmp_path / "run", recorder=lambda direction, m: messages.append((direction, m)))

    assert [entry["aggregated_sites"] for entry in report["rounds"]] == [2, 2]
    assert report["rounds"][0]["train"]["site2"]["num-examples"] == 16
    assert len(messages) == 2 * 2 * 2 * 2  # rounds x (train + evaluate) x (sent + received) x sites
    assert not any(message.has_error() for _, message in messages)
    assert_only_weights_and_aggregates(messages, cohort, start_weights(config))
    assert "| 2 | site3 |" in (tmp_path / "run" / "report.md").read_text()

    path = tmp_path / "run" / "model.safetensors"
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["classes"] == ["0", "1"] and card["task"] == "binary" and card["label"] == "glaucoma"
    assert card["threshold"] is None and card["adaptation"] == "full" and card["federated"]["task"] == "finetune"
    model = create(path, num_classes=len(card["classes"]))
    table = pd.read_parquet(cohort / "manifest.parquet")
    for site in TWO_SITES:
        test = table[(table["site"] == site) & (table["split"] == "test")].reset_index(drop=True)
        probabilities = predict(model, test, cohort, preprocessing(spec(path)), config.finetune_config(),
                                torch.device("cpu"))
        reported = report["rounds"][-1]["evaluate"][site]
        assert reported["num-examples"] == len(test)
        assert roc_auc_score(test["glaucoma"].astype(int), probabilities[:, 1]) == pytest.approx(reported["auroc"])
        assert np.allclose(probabilities.sum(axis=1), 1)
    served = Screener(ServeConfig(model=path, api_key="k" * 16)).model_card()
    assert served["classes"] == ["0", "1"] and served["threshold"] is None and served["label"] == "glaucoma"
