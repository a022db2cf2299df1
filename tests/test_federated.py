"""Federation: FedAvg arithmetic, screening of bad replies, robust aggregation, the sites' local work, and a whole
simulated run whose every message is inspected for anything but weights and aggregate metrics."""

import json
import sys

import cloudpickle
import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from retfm.config import load_config

from retfm.data.config import IngestConfig

from retfm.data.ingest import ingest
from retfm.data.phantoms import generate_cohort
from retfm.errors import RetfmError
from retfm.federated.apps import build_strategy, client_app, restore_strategy, screen, strategy_state
from retfm.federated.config import FederatedConfig
from retfm.federated.simulation import representativeness, resolve_sites, simulate
from retfm.federated.task import MIN_CELL, initial_weights, local_evaluate, local_pretrain, site_profile
from retfm.models import create

PRETRAIN = {"objective": "token-reconstruction", "model": "tiny-vit", "batch_size": 4, "workers": 0, "blr": 0.05,
            "warmup_steps": 0}
METRIC_KEYS = {"num-examples", "loss", "steps", "train-rows", "auroc", "accuracy", "balanced_accuracy", "f1_macro"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("federated")
    generate_cohort(root / "raw", sites=3, per_site=24, size=96, seed=0)
    ingest(root / "raw", root / "ds", IngestConfig(size=64, workers=1))
    return root / "ds"


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages made outside a Flower run (the unit tests' replies) need a run and node identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def _config(cohort, **options) -> FederatedConfig:
    return FederatedConfig(data=str(cohort), pretrain=PRETRAIN, **{"rounds": 2, "local_steps": 2, **options})


def _reply(arrays: dict, examples: int, site: str) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": examples}), "site": ConfigRecord({"name": site})})
    return Message(content=content, dst_node_id=0, message_type="train")


def test_fedavg_of_known_arrays_is_the_weighted_mean(cohort):
    replies = [_reply({"w": [1.0, 2.0], "b": [[0.0]]}, 1, "a"), _reply({"w": [4.0, 8.0], "b": [[3.0]]}, 2, "b")]
    accepted, rejected = screen(replies, max_abs_weight=1e4)
    aggregated, _ = build_strategy(_config(cohort), sites=2).aggregate_train(1, accepted)
    result = aggregated.to_numpy_ndarrays()
    assert rejected == []
    np.testing.assert_allclose(dict(zip(aggregated.keys(), result))["w"], [(1 + 8) / 3, (2 + 16) / 3])
    np.testing.assert_allclose(dict(zip(aggregated.keys(), result))["b"], [[2.0]])


def test_fedadam_resumes_with_its_moments(cohort):
    """A resumed FedAdam run continues with the server-side moments it had, not from zero."""
    config = _config(cohort, strategy="fedadam")
    start = ArrayRecord({"w": Array(np.zeros(3, np.float32))})

    def round_(strategy, server_round, values):
        strategy.configure_train(server_round, start, ConfigRecord({}), _TwoNodes())
        replies = [_reply({"w": np.asarray(v, np.float32)}, 1, name) for name, v in zip("ab", values)]
        return strategy.aggregate_train(server_round, screen(replies, 1e4)[0])[0]["w"].numpy()

    first = build_strategy(config, sites=2)
    round_(first, 1, [[1, 2, 3], [3, 2, 1]])
    resumed = build_strategy(config, sites=2)
    restore_strategy(resumed, strategy_state(first))
    fresh = build_strategy(config, sites=2)
    later = [[0, 1, 0], [2, 1, 0]]
    np.testing.assert_array_equal(round_(resumed, 2, later), round_(first, 2, later))
    assert not np.allclose(round_(fresh, 2, later), round_(resumed, 2, later))
    assert set(strategy_state(first)) == {"m_t", "v_t"} and strategy_state(build_strategy(config, 2)) == {}


class _TwoNodes:
    """A Grid of two connected nodes: enough for a strategy's configure_train to record the round's arrays."""

    def get_node_ids(self):
        return [1, 2]


def test_a_site_profile_counts_groups_and_pools_small_cells(cohort):
    config = _config(cohort, evaluate_label="glaucoma")
    site = resolve_sites(config)[0]
    profile = site_profile(site, config.pretrain_config().split, ["glaucoma"])
    table = pd.read_parquet(cohort / "manifest.parquet")
    rows = table[(table["site"] == site.rows) & (table["split"] == "train")]
    assert profile["images"] == len(rows)
    for column in ("sex", "country", "age_band", "glaucoma"):
        counts = [n for key, n in profile.items() if key.startswith(f"{column}=")]
        assert sum(counts) == len(rows) and min(counts) >= 1
        assert all(n >= MIN_CELL for key, n in profile.items() if key.startswith(f"{column}=") and "fewer" not in key)
    assert profile["sex=F"] == int((rows["sex"] == "F").sum())


def test_representativeness_compares_each_site_with_the_federation():
    history = [{"profile": {"a": {"images": 10, "sex=F": 5, "sex=M": 5}}},
               {"profile": {"a": {"images": 10, "sex=F": 8, "sex=M": 2}, "b": {"images": 30, "sex=F": 6, "sex=M": 24}}}]
    rows = {row["value"]: row for row in representativeness(history)}
    assert rows["F"]["federation"] == pytest.approx(14 / 40) and rows["F"]["sites"] == {"a": 0.8, "b": 0.2}
    assert rows["F"]["max_gap_pp"] == pytest.approx(100 * (0.8 - 14 / 40), abs=0.05)
    assert representativeness([{"train": {}}]) == []


def test_nan_and_huge_replies_are_rejected_and_fp16_is_widened(cohort):
    replies = [_reply({"w": np.array([1.0, 2.0], np.float16)}, 1, "honest"),
               _reply({"w": [np.nan, 1.0]}, 1, "nan"), _reply({"w": [np.inf, 1.0]}, 1, "inf"),
               _reply({"w": [1e6, 1.0]}, 1, "huge")]
    accepted, rejected = screen(replies, max_abs_weight=1e4)
    assert [r.content["site"]["name"] for r in accepted] == ["honest"]
    assert accepted[0].content["arrays"]["w"].numpy().dtype == np.float32
    assert [r["site"] for r in rejected] == ["nan", "inf", "huge"]
    assert all("NaN/Inf or beyond" in r["reason"] for r in rejected)


@pytest.mark.parametrize("strategy", ["fedmedian", "krum", "fedtrimmedavg"])
def test_a_scaled_site_is_outweighed_by_robust_aggregation(cohort, strategy):
    rng = np.random.default_rng(0)
    honest = [rng.normal(0, 0.01, 50) for _ in range(4)]
    attacker = honest[0] * 100 + 20  # within the screen's range: only the strategy can stop it

    def replies():  # fresh each time: some Flower strategies consume the replies' arrays as they aggregate
        accepted, rejected = screen([_reply({"w": w}, 10, f"s{i}") for i, w in enumerate(honest)]
                                    + [_reply({"w": attacker}, 10, "bad")], max_abs_weight=1e4)
        assert len(accepted) == 5 and rejected == []
        return accepted

    options = {"beta": 0.2} if strategy == "fedtrimmedavg" else {"num_malicious_nodes": 1} if strategy == "krum" else {}
    config = _config(cohort, strategy=strategy, strategy_options=options)
    robust, _ = build_strategy(config, sites=5).aggregate_train(1, replies())
    plain, _ = build_strategy(_config(cohort), sites=5).aggregate_train(1, replies())
    clean = np.mean(honest, axis=0)
    robust_error = np.abs(robust.to_numpy_ndarrays()[0] - clean).max()
    plain_error = np.abs(plain.to_numpy_ndarrays()[0] - clean).max()
    assert robust_error < 0.05 and plain_error > 1.0  # FedAvg is dragged off by the attacker, the robust one not


def test_local_work_returns_weights_and_aggregate_metrics_only(cohort):
    config = _config(cohort)
    pretrain = config.pretrain_config()
    site = resolve_sites(config)[0]
    _, weights = initial_weights(pretrain)
    assert not any(k.startswith("teacher.") for k in weights) and any(k.startswith("backbone.") for k in weights)
    new, metrics = local_pretrain(weights, site, 2, pretrain)
    assert new.keys() == weights.keys() and metrics["num-examples"] == 16 and metrics["steps"] == 2
    changed = max(float((new[k] - weights[k]).abs().max()) for k in weights)
    anchored, _ = local_pretrain(weights, site, 2, pretrain, proximal_mu=1e3)  # FedProx pulls toward the global
    distance = sum(float(((new[k] - weights[k]) ** 2).sum()) for k in weights)
    anchored_distance = sum(float(((anchored[k] - weights[k]) ** 2).sum()) for k in weights)
    assert changed > 1e-4 and anchored_distance < distance
    evaluation = local_evaluate(new, site, "glaucoma", pretrain)
    assert set(evaluation) <= METRIC_KEYS and evaluation["num-examples"] == 6
    assert all(isinstance(v, (int, float)) for v in evaluation.values())


def _train_or_fail(weights, site, steps, config, server_round, mu, lora=None):
    """A site that crashes in the middle of round 1."""
    if site.name == "site3" and server_round == 1:
        raise RuntimeError("disk unplugged")
    return local_pretrain(weights, site, steps, config, server_round, mu, lora)


def test_a_simulated_run_moves_only_weights_and_metrics_and_survives_a_crashed_site(cohort, tmp_path):
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers get the failing site by value
    config = _config(cohort, evaluate_label="glaucoma")
    sites = resolve_sites(config)
    messages = []
    report = simulate(config, tmp_path / "run", recorder=lambda direction, m: messages.append((direction, m)),
                      client=client_app(sites, config, train_fn=_train_or_fail))

    first, second = report["rounds"]
    assert first["aggregated_sites"] == 2 and set(first["train"]) == {"site1", "site2"}
    assert len(first["rejected"]) == 1 and "disk unplugged" in first["rejected"][0]["reason"]
    assert second["aggregated_sites"] == 3 and set(second["evaluate"]) == {"site1", "site2", "site3"}
    initial = initial_weights(config.pretrain_config())[1]
    final = create(str(tmp_path / "run" / "model.safetensors")).state_dict()
    assert max(float((final[k] - initial[f"backbone.{k}"]).abs().max()) for k in final) > 1e-4
    assert (tmp_path / "run" / "report.md").read_text().count("| 2 | site") == 3
    assert {row["column"] for row in report["representativeness"]} >= {"sex", "country", "glaucoma"}
    assert set(report["representativeness"][0]["sites"]) == {"site1", "site2", "site3"}

    assert len(messages) == 2 * 2 * 2 * 3  # 2 rounds x (train + evaluate) x (sent + received) x 3 sites
    errors = [message for _, message in messages if message.has_error()]
    assert len(errors) == 1 and "disk unplugged" in errors[0].error.reason
    assert_only_weights_and_aggregates(messages, cohort, initial)


def assert_one_line_config_errors(path, problems: list[tuple[list[str], str]]) -> None:
    """Each (--set overrides, expected text): loading the config at ``path`` with them fails with one line."""
    for sets, expected in problems:
        with pytest.raises(RetfmError) as error:
            load_config(FederatedConfig, path, sets=sets)
        assert expected in str(error.value) and "\n" not in str(error.value), (sets, str(error.value))


def test_pretrain_options_naming_data_adapters_or_their_own_schedule_are_one_line_errors(tmp_path):
    path = tmp_path / "federated.yaml"
    path.write_text(json.dumps({"data": "cohort", "pretrain": {"objective": "token-reconstruction",
                                                              "model": "tiny-vit", "warmup_steps": 3}}))
    assert load_config(FederatedConfig, path).pretrain_config().steps == 30  # the schedule: rounds x local_steps
    assert_one_line_config_errors(path, [
        (["pretrain.data=[x]"], "pretrain.data: the data come from the federation's sites"),
        (["pretrain.lora={rank: 4}"], "pretrain.lora: a federation's adapters are set by transfer_params"),
        (["pretrain.steps=100"], "pretrain.steps: each site runs rounds x local_steps = 30 steps"),
        (["pretrain.warmup_steps=30"], "pretrain.warmup_steps (30) must be below the 30 steps each site runs")])


def assert_only_weights_and_aggregates(messages, cohort, weights: dict, labels=("glaucoma",)) -> None:
    """Every message of a run: arrays of the travelling weights' own names and shapes, scalar metrics, group counts
    (of the profile's groups and ``labels``), the labels' and sites' names; no identifier anywhere. A site's failure
    may come back instead of a reply."""
    manifest = pd.read_parquet(cohort / "manifest.parquet")
    identifiers = set(manifest["image_id"]) | set(manifest["patient_id"]) | set(manifest["path"])
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    for direction, message in messages:
        if message.has_error():
            assert direction == "received"
            continue
        content = message.content
        assert set(content.keys()) <= {"arrays", "config", "metrics", "site", "profile"}
        if "profile" in content:  # group counts of the site's images: "column=value" keys, nothing per image
            assert {key.partition("=")[0] for key in content["profile"]} <= {"images", "sex", "country", "age_band",
                                                                               *labels}
            assert not {key.partition("=")[2] for key in content["profile"]} & identifiers
        for record in content.array_records.values():
            assert {k: tuple(a.shape) for k, a in record.items()} == shapes
        for record in content.metric_records.values():
            assert set(record) <= METRIC_KEYS and all(isinstance(v, (int, float)) for v in record.values())
        for record in content.config_records.values():  # round settings, the label's name, the site's name
            for value in record.values():
                assert isinstance(value, (int, float)) or value in {*labels, "site1", "site2", "site3"}
                assert str(value) not in identifiers
