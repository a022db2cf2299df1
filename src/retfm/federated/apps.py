"""Flower apps of a retfm federation, on Flower's Message API.

The ClientApp is a site: ``train`` runs the task's local work (:func:`retfm.federated.task.local_pretrain`,
:func:`~retfm.federated.task.local_finetune` or :func:`~retfm.federated.task.local_synth`) from the global weights
it receives and replies with its new weights and a MetricRecord (``num-examples``, ``loss``, ``steps``);
``evaluate`` runs :func:`~retfm.federated.task.local_evaluate` (a probe of the global backbone),
:func:`~retfm.federated.task.local_test` (the global classifier on the site's test split) or
:func:`~retfm.federated.task.local_synth_test` (the global generator's denoising loss there) and replies with
aggregate metrics only. Each reply also carries a ConfigRecord ``site`` naming the site, so the coordinator can
report per site.

The ServerApp is the coordinator. Its loop is Flower's (a strategy configures and aggregates each round) with
what a multi-site medical run needs around it: every reply is screened before aggregation (a site that failed,
or sent NaN/Inf or out-of-range weights, is left out of the round and reported), fp16 replies are widened to
fp32 before averaging, and the global weights and history are checkpointed after every round so a stopped run
resumes at the next one. Strategies are Flower's own (``flwr.serverapp.strategy``). With ``dp`` the strategy wears
Flower's central-DP wrapper, the sites clip their updates, and each round's (epsilon, delta) joins the history
(:mod:`retfm.federated.privacy`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flower

from retfm.errors import RetfmError
from retfm.federated.config import STRATEGY_CLASSES, FederatedConfig
from retfm.federated.privacy import CLIP_NORM_KEY, clip_update, private_strategy, privacy_spent
from retfm.federated.task import (Site, contributed, local_evaluate, local_finetune, local_pretrain, local_synth,
                                  local_synth_test, local_test, start_weights)
from retfm.runs import CHECKPOINT_FILENAME, load_checkpoint, save_whole

STRATEGIES = {name: getattr(flower, cls) for name, cls in STRATEGY_CLASSES.items()}

# a site's work per task
LOCAL_TRAIN = {"pretrain": local_pretrain, "finetune": local_finetune, "synth": local_synth}
LOCAL_EVALUATE = {"pretrain": local_evaluate, "finetune": local_test, "synth": local_synth_test}

SERVER_OPTIMISER_STATE = ("m_t", "v_t")  # flwr's FedOpt strategies keep their moments in these attributes
Recorder = Callable[[str, Message], None]  # (direction "sent" | "received", message)
SiteResolver = Callable[[Context], tuple[Site, FederatedConfig]]  # a node's site and the federation's config


def build_strategy(config: FederatedConfig, sites: int) -> flower.Strategy:
    """The configured Flower strategy; by default every site trains and evaluates in every round. With ``dp``:
    wrapped for central differential privacy, every site weighing the same (each runs ``local_steps`` steps)."""
    options = {"min_available_nodes": sites, "min_train_nodes": sites, "min_evaluate_nodes": sites,
               "fraction_evaluate": 1.0 if config.evaluate_label else 0.0,
               **({"weighted_by_key": "steps"} if config.dp else {}), **config.strategy_options}
    try:
        strategy = STRATEGIES[config.strategy](**options)
    except (TypeError, ValueError) as exc:
        raise RetfmError(f"strategy_options for {config.strategy}: {exc}") from None
    return private_strategy(strategy, config.dp, sites) if config.dp else strategy


# ---- the site -----------------------------------------------------------------------------------------------------

def client_app(sites: list[Site], config: FederatedConfig, train_fn=None, evaluate_fn=None) -> ClientApp:
    """The simulation's ClientApp serving ``sites``: a node's site is its ``partition-id`` (set by the simulation
    engine). ``train_fn`` / ``evaluate_fn`` replace the task's own work (see :func:`site_app`)."""
    def simulated_site(context: Context) -> tuple[Site, FederatedConfig]:
        # a simulated site computes on the cores reserved for it, not on every core of the machine
        torch.set_num_threads(max(1, int(config.cpus_per_site)))
        return sites[int(context.node_config["partition-id"])], config

    return site_app(simulated_site, train_fn, evaluate_fn)


def site_app(resolve: SiteResolver, train_fn=None, evaluate_fn=None) -> ClientApp:
    """The ClientApp of a site; ``resolve(context)`` gives the node's site and the federation's config (the
    simulation's by partition-id, the deployment engine's from node and run config: :mod:`retfm.federated.deploy`).
    ``train_fn`` / ``evaluate_fn``: the site's work, by default the config's task's (:data:`LOCAL_TRAIN`,
    :data:`LOCAL_EVALUATE`); each is called with the task's options (``config.local_config()`` and
    ``config.local_options()``)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site, config = resolve(context)
        settings = msg.content["config"]
        weights = msg.content["arrays"].to_torch_state_dict()
        work = train_fn or LOCAL_TRAIN[config.task]
        new, metrics = work(weights, site, int(settings["local-steps"]), config.local_config(),
                            int(settings["server-round"]), float(settings.get("proximal-mu", 0.0)),
                            **config.local_options())
        if CLIP_NORM_KEY in settings:  # differential privacy: the site clips, the coordinator adds the noise
            new = clip_update(new, weights, float(settings[CLIP_NORM_KEY]),
                              torch.float16 if config.transfer == "fp16" else torch.float32)
        if config.transfer == "fp16":
            new = {k: v.half() if v.is_floating_point() else v for k, v in new.items()}
        return Message(RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics),
                                   "site": ConfigRecord({"name": site.name}),
                                   "profile": ConfigRecord(contributed(site, config))}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site, config = resolve(context)
        weights = msg.content["arrays"].to_torch_state_dict()
        work = evaluate_fn or LOCAL_EVALUATE[config.task]
        metrics = work(weights, site, str(msg.content["config"]["label"]), config.local_config(),
                       **config.local_options())
        return Message(RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site.name})}),
                       reply_to=msg)

    return app


# ---- the coordinator ----------------------------------------------------------------------------------------------

def server_app(config: FederatedConfig, sites: int, out: Path, resume: bool = False,
               recorder: Recorder | None = None) -> ServerApp:
    """A ServerApp that runs the federation and checkpoints it in ``out`` (see :func:`coordinate`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        coordinate(grid, config, sites, out, resume, recorder)

    return app


def coordinate(grid: Grid, config: FederatedConfig, sites: int, out: Path, resume: bool = False,
               recorder: Recorder | None = None) -> dict:
    """Run ``config.rounds`` rounds (from the last checkpoint when ``resume``); returns the checkpoint's content:
    ``{"round", "weights", "history", "privacy"}`` with one history entry per round (and the DP accountant's
    state)."""
    strategy = build_strategy(config, sites)
    checkpoint_path = out / CHECKPOINT_FILENAME
    if resume and checkpoint_path.exists():
        saved = load_checkpoint(checkpoint_path)
        restore_strategy(strategy, saved.get("strategy", {}))
    else:
        saved = {"round": 0, "weights": start_weights(config), "history": []}
    if config.dp:
        _restore_accountant(strategy, saved)
    arrays = ArrayRecord(saved["weights"])

    def exchange(messages) -> list[Message]:
        messages = list(messages)
        for message in messages:
            _record(recorder, "sent", message)
        replies = list(grid.send_and_receive(messages, timeout=config.timeout))
        for reply in replies:
            _record(recorder, "received", reply)
        return replies, sum(_array_bytes(m) for m in messages), sum(_array_bytes(r) for r in replies)

    for server_round in range(saved["round"] + 1, config.rounds + 1):
        started = time.perf_counter()
        replies, sent, received = exchange(strategy.configure_train(
            server_round, arrays, ConfigRecord({"local-steps": config.local_steps}), grid))
        accepted, rejected = screen(replies, config.max_abs_weight)
        accepted.sort(key=_site)  # replies arrive in any order: summed in one, a run's result is reproducible
        entry = {"round": server_round, "train": {_site(r): dict(r.content["metrics"]) for r in accepted},
                 "profile": {_site(r): dict(r.content["profile"]) for r in accepted if "profile" in r.content},
                 "rejected": rejected, "bytes_sent": sent, "bytes_received": received}
        aggregated, _ = strategy.aggregate_train(server_round, accepted) if accepted else (None, None)
        if aggregated is not None:
            arrays = aggregated
        entry["aggregated_sites"] = len(accepted) if aggregated is not None else 0
        if config.dp:
            entry["privacy"] = privacy_spent(strategy)
        if config.evaluate_label:
            replies, _, _ = exchange(strategy.configure_evaluate(
                server_round, arrays, ConfigRecord({"label": config.evaluate_label}), grid))
            ok = [r for r in replies if not r.has_error()]
            entry["evaluate"] = {_site(r): dict(r.content["metrics"]) for r in ok}
            entry["evaluate_failed"] = [_failure(r) for r in replies if r.has_error()]
        entry["seconds"] = round(time.perf_counter() - started, 3)
        saved = {"round": server_round, "weights": arrays.to_torch_state_dict(), "history": saved["history"] + [entry],
                 "strategy": strategy_state(strategy), "privacy": strategy.accountant.state_dict() if config.dp else None}
        _save(checkpoint_path, saved)
    return saved


def strategy_state(strategy: flower.Strategy) -> dict[str, dict[str, torch.Tensor]]:
    """The coordinator's own optimiser state, which a resumed run needs: the moments of FedAdam, FedYogi and
    FedAdagrad (empty for strategies that keep none)."""
    return {name: {key: torch.from_numpy(np.array(value)) for key, value in getattr(strategy, name).items()}
            for name in SERVER_OPTIMISER_STATE if getattr(strategy, name, None)}


def restore_strategy(strategy: flower.Strategy, state: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, arrays in state.items():
        setattr(strategy, name, {key: value.numpy() for key, value in arrays.items()})


def _restore_accountant(strategy, saved: dict) -> None:
    """Resume the privacy accounting of the checkpoint's rounds; refuse when they ran without DP."""
    if saved["round"] and not saved.get("privacy"):
        raise RetfmError("dp: the checkpoint's rounds ran without differential privacy; start a new run")
    if saved.get("privacy"):
        try:
            strategy.accountant.load_state_dict(saved["privacy"])
        except ValueError as exc:
            raise RetfmError(f"dp: the checkpoint's privacy accounting does not fit this config ({exc})") from None


def screen(replies: list[Message], max_abs_weight: float) -> tuple[list[Message], list[dict]]:
    """Replies fit to aggregate, and why each other one was left out: the site failed, or its weights hold a
    NaN/Inf or a value beyond ``max_abs_weight``. Accepted fp16 weights are widened to fp32 in place, so that
    averaging is done at full precision."""
    accepted, rejected = [], []
    for reply in replies:
        if reply.has_error():
            rejected.append(_failure(reply))
            continue
        record = reply.content["arrays"]
        arrays = {key: array.numpy() for key, array in record.items()}
        bad = next((key for key, value in arrays.items() if value.dtype.kind == "f" and not (
            np.isfinite(value).all() and np.abs(value).max(initial=0) <= max_abs_weight)), None)
        if bad is not None:
            rejected.append({"site": _site(reply), "node": reply.metadata.src_node_id,
                             "reason": f"weights of {bad} are NaN/Inf or beyond {max_abs_weight:g}"})
            continue
        reply.content["arrays"] = ArrayRecord({key: Array(value.astype(np.float32) if value.dtype == np.float16
                                                          else value) for key, value in arrays.items()})
        accepted.append(reply)
    return accepted, rejected


def _site(reply: Message) -> str:
    return str(reply.content["site"]["name"])


def _failure(reply: Message) -> dict:
    return {"site": None, "node": reply.metadata.src_node_id,
            "reason": f"site failed: {reply.error.reason.strip().splitlines()[-1][:200]}"}


def _array_bytes(message: Message) -> int:
    if message.has_error():
        return 0
    return sum(len(array.data) for record in message.content.array_records.values() for array in record.values())


def _record(recorder: Recorder | None, direction: str, message: Message) -> None:
    if recorder is not None:
        recorder(direction, message)


def _save(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_whole(payload, path)
