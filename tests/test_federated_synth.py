"""Federated generator training: a site's local steps are `retfm synth train`'s (they learn, send only the UNet and
refuse a condition value the federation does not know), fp16 + DP runs through the real ClientApp and coordinator,
and one simulated run ends in a generator folder that `retfm synth sample` and `assemble` read unchanged."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from retfm.config import load_config

from retfm.federated.config import FederatedConfig

from retfm.errors import RetfmError
from retfm.federated.simulation import finish, resolve_sites, simulate
from retfm.federated.task import local_synth, local_synth_test, start_weights
from retfm.synth.assemble import assemble
from retfm.synth.config import SynthAssembleConfig, SynthSampleConfig
from retfm.synth.generator import Conditions, verified_card
from retfm.synth.sample import sample
from retfm.synth.train import build_denoiser
from tests.test_federated import assert_one_line_config_errors, assert_only_weights_and_aggregates, cohort, task_identity  # noqa: F401
from tests.test_federated_privacy import coordinate_in_process

GRADES = [0, 1, 2, 3, 4]
SYNTH = {"label": "dr_grade", "classes": GRADES, "size": 16, "block_out_channels": [16, 32], "batch_size": 8,
         "lr": 2e-3, "workers": 0}
TWO_SITES = ["site2", "site3"]


def _config(cohort, synth=None, **options) -> FederatedConfig:
    sites = [{"name": name, "data": str(cohort), "rows": name} for name in TWO_SITES]
    return FederatedConfig(sites=sites, task="synth", synth={**SYNTH, **(synth or {})},
                           **{"rounds": 2, "local_steps": 2, **options})


def test_local_synth_steps_lower_the_loss_and_send_the_unet_only(cohort):
    config = _config(cohort)
    site = resolve_sites(config)[0]
    local, conditions = config.synth_config(), config.synth_conditions()
    start = start_weights(config)
    unet = build_denoiser(local, Conditions(conditions))[0]
    assert set(start) == {name for name, _ in unet.named_parameters()} == set(unet.state_dict())
    assert tuple(start["class_embedding.weight"].shape)[0] == len(GRADES) + 1  # and the null class

    new, metrics = local_synth(start, site, 6, local, conditions=conditions)
    train_rows = pd.read_parquet(cohort / "manifest.parquet").query("site == 'site2' and split == 'train'")
    assert new.keys() == start.keys() and metrics["num-examples"] == len(train_rows) and metrics["steps"] == 6
    # the same round's batches and draws again, from the trained weights: the loss is lower
    _, again = local_synth(new, site, 6, local, conditions=conditions)
    assert again["loss"] < metrics["loss"] - 0.05, (metrics, again)

    before = local_synth_test(start, site, "dr_grade", local, conditions=conditions)
    after = local_synth_test(new, site, "dr_grade", local, conditions=conditions)
    assert set(after) == {"num-examples", "loss"} and after["num-examples"] > 0
    assert after == local_synth_test(new, site, "dr_grade", local, conditions=conditions)  # fixed draws
    assert after["loss"] < before["loss"], (before, after)


def test_a_site_missing_a_value_trains_and_a_foreign_value_is_a_one_line_error(cohort):
    config = _config(cohort, {"classes": [*GRADES, 9]})
    site = resolve_sites(config)[0]
    _, metrics = local_synth(start_weights(config), site, 1, config.synth_config(),
                             conditions=config.synth_conditions())
    assert metrics["steps"] == 1
    narrow = _config(cohort, {"classes": [0]})
    with pytest.raises(RetfmError) as error:
        local_synth(start_weights(narrow), site, 1, narrow.synth_config(), conditions=narrow.synth_conditions())
    assert str(error.value).startswith("site site2: condition dr_grade=") and "not one of the generator's values (0)" \
        in str(error.value) and "\n" not in str(error.value)


def test_synth_config_errors_are_one_line(cohort, tmp_path):
    path = tmp_path / "federated.yaml"
    path.write_text(json.dumps({"data": str(cohort), "task": "synth",
                                "synth": {**SYNTH, "cond": ["site"],
                                          "classes": {"dr_grade": GRADES, "site": ["site1", "site2", "site3"]}}}))
    assert load_config(FederatedConfig, path).synth_conditions()["site"] == ["site1", "site2", "site3"]
    problems = [(["synth.data=x"], "synth.data: the data come from the federation's sites"),
                (["synth.sites=[site1]"], "synth.sites: the data come from the federation's sites"),
                (["synth.classes=[0,1]"], "synth.classes: the values of dr_grade, site as a mapping"),
                (["synth.classes={site: [a], dr_grade: [0]}"], "synth.classes: the values of dr_grade, site"),
                (["synth.classes.site=[a,a]"], "synth.classes.site: a list of distinct values"),
                (["synth.size=8"], "synth.size"),
                (["synth.base_model=/models/sd"], "synth.base_model: federated training of a LoRA generator"),
                (["transfer_params=lora"], "task synth: every UNet weight travels"),
                (["evaluate_label=glaucoma"], "the generator is conditioned on 'dr_grade'"),
                (["task=finetune"], "task finetune: give finetune options, not pretrain or synth")]
    assert_one_line_config_errors(path, problems)


def test_an_fp16_dp_round_sends_unet_tensors_and_ends_in_a_generator_that_samples(cohort, tmp_path):
    config = _config(cohort, transfer="fp16", evaluate_label="dr_grade",
                     dp={"clip_norm": 1.0, "noise_multiplier": 0.01})
    start = start_weights(config)
    saved, messages, train = coordinate_in_process(config, tmp_path)
    assert len(train) == 2 * 2 * 2  # rounds x (sent + received) x sites
    assert all(keys == list(start) and dtypes == {"float16" if direction == "received" else "float32"}
               for direction, keys, dtypes in train)
    assert_only_weights_and_aggregates(messages, cohort, start, labels=("dr_grade",))
    assert [entry["aggregated_sites"] for entry in saved["history"]] == [2, 2]
    assert set(saved["history"][-1]["evaluate"]) == set(TWO_SITES) and saved["history"][-1]["privacy"]["epsilon"] > 0

    report = finish(config, TWO_SITES, tmp_path)
    card = verified_card(tmp_path)
    assert report["task"] == "synth" and card["federated"]["dp"]["releases"] == 2 and card["ema"] is False
    assert card["conditions"] == {"dr_grade": GRADES} and card["steps"] == 4 and card["images_seen"] == 2 * 2 * 2 * 8
    assert card["data"]["sites"] == TWO_SITES and str(cohort) not in json.dumps(card)
    table = pd.read_parquet(cohort / "manifest.parquet").query("site in @TWO_SITES and split == 'train'")
    expected = table["dr_grade"].value_counts(normalize=True)
    shares = card["class_shares"]["dr_grade"]
    assert list(shares) == list(map(str, GRADES)) and sum(shares.values()) == pytest.approx(1, abs=1e-5)
    for grade, share in shares.items():  # exact for a grade every site counts (5+ images); estimated otherwise
        if table["dr_grade"].eq(int(grade)).groupby(table["site"]).sum().min() >= 5:
            assert share == pytest.approx(expected[int(grade)], abs=1e-5)
    assert shares["0"] == pytest.approx(expected[0], abs=1e-5)  # the case above occurs: grade 0 at both sites

    result = sample(tmp_path, tmp_path / "syn", SynthSampleConfig(n=3, inference_steps=2, batch_size=3))
    assert result["generator_id"] == card["generator_id"]
    assert len(list((tmp_path / "syn" / "images").glob("*.png"))) == 3
    central = assemble([tmp_path], tmp_path / "central", SynthAssembleConfig(n=2, inference_steps=2, batch_size=2))
    assert central["images"] == 2


def test_a_simulated_synth_run_writes_a_generator_folder(cohort, tmp_path):
    config = _config(cohort, {"cond": ["site"], "classes": {"dr_grade": GRADES, "site": TWO_SITES}},
                     evaluate_label="dr_grade")
    messages = []
    report = simulate(config, tmp_path / "run", recorder=lambda direction, m: messages.append((direction, m)))
    assert [entry["aggregated_sites"] for entry in report["rounds"]] == [2, 2]
    assert len(messages) == 2 * 2 * 2 * 2 and not any(m.has_error() for _, m in messages)
    assert_only_weights_and_aggregates(messages, cohort, start_weights(config), labels=("dr_grade", "site"))
    losses = {site: [entry["evaluate"][site]["loss"] for entry in report["rounds"]] for site in TWO_SITES}
    assert all(np.isfinite(v).all() for v in losses.values())
    assert "test loss" in (tmp_path / "run" / "report.md").read_text()

    card = verified_card(tmp_path / "run")
    assert card["federated"]["task"] == "synth" and card["class_shares"]["site"].keys() == set(TWO_SITES)
    sample(tmp_path / "run", tmp_path / "syn", SynthSampleConfig(n=2, inference_steps=2, labels="site=site3:1"))
    assert set(pd.read_parquet(tmp_path / "syn" / "manifest.parquet")["site"]) == {"site3"}
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["round"] == 2
