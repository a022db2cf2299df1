"""Round overhead of a Flower federation (issue 8's "Measure"): the wall-clock of federated rounds against the same
local work without Flower, in the same run.

Both sides do identical work: every site runs ``retfm.federated.task.local_pretrain`` for ``--local-steps`` steps
from the round's global weights, and the weights are averaged by image count (FedAvg).

- reference: a plain loop in this process, sites one after another, the average taken with torch;
- flower: ``retfm federated run``'s code (Flower's simulation engine: a ServerApp, one Ray worker per site with
  one core each, messages with the weights as ArrayRecords, reply screening and a checkpoint every round).

Reported: seconds per round (each side's median), Flower's start-up (run time minus its rounds) and bytes sent per
round. Run: ``PYTHONPATH=src python benchmarks/federated_round.py [--sites 4 --rounds 3 --local-steps 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from retfm.data.config import IngestConfig

from retfm.data.ingest import ingest
from retfm.data.phantoms import generate_cohort
from retfm.federated.config import FederatedConfig
from retfm.federated.simulation import resolve_sites, simulate
from retfm.federated.task import initial_weights, local_pretrain

PRETRAIN = {"objective": "token-reconstruction", "model": "vit-demo-p8", "batch_size": 16, "blr": 0.02,
            "warmup_steps": 0, "workers": 0}


def plain_rounds(config: FederatedConfig) -> list[float]:
    """The federation's work without Flower: seconds of each round."""
    pretrain = config.pretrain_config()
    weights = initial_weights(pretrain)[1]
    seconds = []
    for server_round in range(1, config.rounds + 1):
        started = time.perf_counter()
        replies = [local_pretrain(weights, site, config.local_steps, pretrain, server_round)
                   for site in resolve_sites(config)]
        total = sum(metrics["num-examples"] for _, metrics in replies)
        weights = {key: sum(new[key].double() * metrics["num-examples"] for new, metrics in replies) / total
                   for key in weights}
        weights = {key: value.to(torch.float32) for key, value in weights.items()}
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--per-site", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        generate_cohort(work / "phantoms", args.sites, args.per_site, size=128)
        ingest(work / "phantoms", work / "cohort", IngestConfig(size=64, workers=1))
        config = FederatedConfig(data=str(work / "cohort"), pretrain=PRETRAIN, rounds=args.rounds,
                                 local_steps=args.local_steps)
        torch.set_num_threads(1)  # as each simulated site: one core
        plain = plain_rounds(config)
        started = time.perf_counter()
        report = simulate(config, work / "federated")
        flower_total = time.perf_counter() - started
    flower = [entry["seconds"] for entry in report["rounds"]]
    result = {
        "sites": args.sites, "rounds": args.rounds, "local_steps": args.local_steps, "model": PRETRAIN["model"],
        "machine_cores": os.cpu_count(),
        "reference_rounds_s": [round(s, 2) for s in plain], "flower_rounds_s": flower,
        "reference_round_s": round(statistics.median(plain), 2),
        "flower_round_s": round(statistics.median(flower), 2),
        "flower_over_reference": round(statistics.median(flower) / statistics.median(plain), 2),
        "flower_startup_s": round(flower_total - sum(flower), 1),
        "mb_sent_per_round": round(report["rounds"][-1]["bytes_sent"] / 1e6, 2),
        "mb_received_per_round": round(report["rounds"][-1]["bytes_received"] / 1e6, 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
