"""Federation privacy and LoRA-only transfer: a site's clipping, the coordinator's noise and (epsilon, delta)
against dp-accounting's own numbers, config errors, and a whole run with LoRA adapters, fp16 and DP through the
real ClientApp and coordinator loop, called in this process (no Ray), down to the merged checkpoint."""

import math

import numpy as np
import pytest
import torch
import yaml
from dp_accounting import GaussianDpEvent
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from retfm.config import load_config

from retfm.errors import RetfmError
from retfm.federated.apps import build_strategy, client_app, coordinate
from retfm.federated.config import FederatedConfig
from retfm.federated.privacy import CLIP_NORM_KEY, clip_update, privacy_spent
from retfm.federated.simulation import finish, resolve_sites
from retfm.federated.task import initial_weights, seeded_model
from retfm.models import create
from tests.test_federated import PRETRAIN, _config, _reply, cohort, task_identity  # noqa: F401 (fixtures)


class InProcessGrid:
    """The part of a Flower Grid the coordinator uses, with node i + 1 running ``app`` as site i in this process."""

    def __init__(self, app, sites: int):
        self.app, self.sites = app, sites

    def get_node_ids(self):
        return range(1, self.sites + 1)

    def send_and_receive(self, messages, timeout=None):
        return [self.app(m, Context(1, m.metadata.dst_node_id, {"partition-id": m.metadata.dst_node_id - 1},
                                    RecordDict(), {})) for m in messages]


def coordinate_in_process(config, out):
    """Run the coordinator with every site in this process. Returns its checkpoint content, every message as
    (direction, message), and (direction, keys, dtypes) of each train message's arrays as they crossed the wire
    (the coordinator widens fp16 replies afterwards)."""
    messages, train = [], []

    def record(direction, message):
        messages.append((direction, message))
        if message.metadata.message_type == "train":
            arrays = message.content["arrays"]
            train.append((direction, list(arrays.keys()), {a.dtype for a in arrays.values()}))

    sites = resolve_sites(config)
    saved = coordinate(InProcessGrid(client_app(sites, config), len(sites)), config, len(sites), out, recorder=record)
    return saved, messages, train


def _norm(new: dict, old: dict) -> float:
    return math.sqrt(sum(float(((new[k].double() - old[k].double()) ** 2).sum()) for k in old))


def _library_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(GaussianDpEvent(noise_multiplier), releases)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_clipping_bounds_the_update_norm_exactly_on_the_wire(dtype):
    generator = torch.Generator().manual_seed(0)
    old = {"w": 0.05 * torch.randn(300, 40, generator=generator), "norm": torch.ones(500)}
    big = {k: v + torch.randn(v.shape, generator=generator) for k, v in old.items()}  # norm ~ 112
    clipped = clip_update(big, old, 1.0, dtype)
    assert all(v.dtype == dtype for v in clipped.values())
    # never above the bound once rounded to the wire's dtype; fp16 keeps a margin for its worst-case rounding
    assert (1 - 1e-5 if dtype == torch.float32 else 0.95) < _norm(clipped, old) <= 1.0
    direction = torch.cat([(clipped[k].double() - old[k]).flatten() for k in old])
    raw = torch.cat([(big[k] - old[k]).double().flatten() for k in old])
    assert float(torch.nn.functional.cosine_similarity(direction, raw, dim=0)) > 0.999  # scaled, not bent

    small = {k: v + 1e-4 * torch.randn(v.shape, generator=generator) for k, v in old.items()}
    kept = clip_update(small, old, 1.0, torch.float32)
    assert all(torch.equal(kept[k], small[k]) for k in old)  # within the bound: untouched


def test_coordinator_noise_has_the_calibrated_std_and_a_missing_site_spends_nothing(cohort):
    config = _config(cohort, dp={"clip_norm": 0.5, "noise_multiplier": 2.0, "delta": 1e-5})
    strategy = build_strategy(config, sites=4)
    zeros = np.zeros(200_000, np.float32)
    messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(zeros)}), ConfigRecord({"local-steps": 1}),
                                             InProcessGrid(None, 4)))
    assert len(messages) == 4 and {m.content["config"][CLIP_NORM_KEY] for m in messages} == {0.5}

    def replies():  # unequal image counts: DP weighs every site the same (by its steps)
        replies = [_reply({"w": zeros}, examples, f"s{examples}") for examples in (5, 10, 20, 40)]
        for reply in replies:
            reply.content["metrics"]["steps"] = 1
        return replies

    np.random.seed(0)  # Flower draws the noise from numpy's global generator
    aggregated, _ = strategy.aggregate_train(1, replies())
    noise = aggregated["w"].numpy()
    assert noise.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.01) and abs(noise.mean()) < 0.002
    assert privacy_spent(strategy) == {"epsilon": pytest.approx(_library_epsilon(2.0, 1, 1e-5), rel=1e-9),
                                       "delta": 1e-5, "releases": 1}

    strategy.configure_train(2, ArrayRecord({"w": Array(zeros)}), ConfigRecord({"local-steps": 1}),
                             InProcessGrid(None, 4))
    assert strategy.aggregate_train(2, replies()[:3]) == (None, None)  # the noise is calibrated to 4 sites
    assert privacy_spent(strategy)["releases"] == 1


def test_epsilon_grows_with_rounds_and_shrinks_with_noise_as_dp_accounting_says(cohort):
    epsilons = {}
    for noise_multiplier in (1.0, 4.0):
        strategy = build_strategy(_config(cohort, dp={"noise_multiplier": noise_multiplier}), sites=3)
        arrays = ArrayRecord({"w": Array(np.zeros(10, np.float32))})
        for server_round in (1, 2, 3):
            strategy.configure_train(server_round, arrays, ConfigRecord({"local-steps": 1}), InProcessGrid(None, 3))
            replies = [_reply({"w": np.zeros(10, np.float32)}, 1, f"s{i}") for i in range(3)]
            for reply in replies:
                reply.content["metrics"]["steps"] = 1
            strategy.aggregate_train(server_round, replies)
            epsilons[noise_multiplier, server_round] = privacy_spent(strategy)["epsilon"]
            assert epsilons[noise_multiplier, server_round] == pytest.approx(
                _library_epsilon(noise_multiplier, server_round, 1e-5), rel=1e-9)
    for z in (1.0, 4.0):
        assert epsilons[z, 1] < epsilons[z, 2] < epsilons[z, 3]
    assert all(epsilons[4.0, r] < epsilons[1.0, r] / 3 for r in (1, 2, 3))


def test_dp_config_errors_are_one_line(cohort, tmp_path):
    path = tmp_path / "federated.yaml"
    path.write_text(yaml.safe_dump({"data": str(cohort), "pretrain": PRETRAIN, "dp": None}))
    assert load_config(FederatedConfig, path).dp is None  # off by default
    assert load_config(FederatedConfig, path, sets=["dp.delta=1e-6"]).dp.noise_multiplier == 1.0  # on via --set
    problems = [(["dp.noise_multiplier=0"], "option dp.noise_multiplier: Input should be greater than 0"),
                (["dp.clip_norm=-1"], "option dp.clip_norm: Input should be greater than 0"),
                (["dp.delta=1.5"], "option dp.delta: Input should be less than 1"),
                (["dp.delta=1e-6", "strategy=fedmedian"], "differential privacy needs strategy fedavg or fedprox")]
    for sets, expected in problems:
        with pytest.raises(RetfmError) as error:
            load_config(FederatedConfig, path, sets=sets)
        assert expected in str(error.value) and "\n" not in str(error.value)
    config = load_config(FederatedConfig, path, sets=["dp.delta=0.4"])
    with pytest.raises(RetfmError, match=r"below 1/sites \(0.333333 for 3 sites\)") as error:
        build_strategy(config, sites=3)
    assert "\n" not in str(error.value)


def test_dp_refuses_to_resume_rounds_that_ran_without_it(cohort, tmp_path):
    torch.save({"round": 1, "weights": {}, "history": [{}]}, tmp_path / "checkpoint.pt")
    with pytest.raises(RetfmError, match="the checkpoint's rounds ran without differential privacy"):
        coordinate(InProcessGrid(None, 3), _config(cohort, dp={}), 3, tmp_path, resume=True)


def test_a_lora_fp16_dp_run_sends_only_adapters_and_head_and_merges_them_at_the_end(cohort, tmp_path):
    config = _config(cohort, transfer_params="lora", transfer="fp16", evaluate_label="glaucoma",
                     dp={"clip_norm": 0.5, "noise_multiplier": 1.0})
    pretrain, lora = config.pretrain_config(), config.lora_options()
    sites = resolve_sites(config)
    start = initial_weights(pretrain, lora)[1]
    full = initial_weights(pretrain)[1]
    assert all(".lora_A." in k or ".lora_B." in k or not k.startswith("backbone.") for k in start)
    assert {k for k in start if not k.startswith("backbone.")} == {k for k in full if not k.startswith("backbone.")}

    saved, messages, train = coordinate_in_process(config, tmp_path)
    assert len(train) == 2 * 2 * 3  # rounds x (sent + received) x sites
    for direction, keys, dtypes in train:
        assert keys == list(start)  # adapters, projector and mask token: nothing of the frozen base
        assert dtypes == {"float16" if direction == "received" else "float32"}
    full_bytes = sum(len(a.data) for a in ArrayRecord(full).values()) * len(sites)
    for entry in saved["history"]:
        assert entry["aggregated_sites"] == 3
        assert entry["bytes_received"] < entry["bytes_sent"] / 1.9 and entry["bytes_sent"] < full_bytes / 10
    assert [e["privacy"]["epsilon"] for e in saved["history"]] == pytest.approx(
        [_library_epsilon(1.0, r, 1e-5) for r in (1, 2)], rel=1e-9)

    report = finish(config, [site.name for site in sites], tmp_path)
    assert report["dp"]["epsilon"] == saved["history"][-1]["privacy"]["epsilon"] and report["dp"]["releases"] == 2
    assert "| 2 | 3 | none |" in (tmp_path / "report.md").read_text()
    merged = create(str(tmp_path / "model.safetensors")).state_dict()
    base = seeded_model(pretrain)[1].backbone.state_dict()
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(merged[k], base[k])}
    assert changed == {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"}  # LoRA merged; the rest is frozen


def test_a_coordinator_stopped_after_a_round_resumes_to_the_uninterrupted_result(cohort, tmp_path):
    """Round checkpoints: a coordinator stopped as round 3 of 3 starts, then --resume, ends bit for bit where the
    three rounds in one go end (FedAdam: its moments resume too; replies are aggregated in site order, whatever order
    they arrive in; the sites' learning-rate schedule spans the three rounds)."""
    config = _config(cohort, rounds=3, strategy="fedadam")
    sites = resolve_sites(config)
    whole = coordinate(InProcessGrid(client_app(sites, config), len(sites)), config, len(sites), tmp_path / "whole")

    class Stopped(Exception):
        pass

    def stop_at_round_3(direction, message):
        if direction == "sent" and message.content["config"]["server-round"] == 3:
            raise Stopped

    with pytest.raises(Stopped):
        coordinate(InProcessGrid(client_app(sites, config), len(sites)), config, len(sites), tmp_path / "cut",
                   recorder=stop_at_round_3)
    resumed = coordinate(InProcessGrid(client_app(sites, config), len(sites)), config, len(sites), tmp_path / "cut",
                         resume=True)
    assert [entry["round"] for entry in resumed["history"]] == [1, 2, 3]
    assert all(torch.equal(whole["weights"][k], resumed["weights"][k]) for k in whole["weights"])
