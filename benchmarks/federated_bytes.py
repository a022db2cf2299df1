"""Bytes a federation moves per site and round: the full trainable weights in fp32 or fp16 against LoRA-only
transfer (adapters + the objective's head) in fp32 or fp16.

No training is needed: the tensors that travel are fixed by the model, the objective and the transfer options, so
this builds each objective as a site does (``retfm.federated.task.initial_weights``, random weights) and counts the
bytes of its Flower ArrayRecord, as the run's report does. The coordinator always sends fp32; ``transfer`` sets
what the sites send back. Models: ``tiny-vit`` (the tests' 64 px ViT) and ViT-B/16 at 224 px (the architecture of
``visionfm-cfp``); objectives: token reconstruction (projector D x D x 2) and MAE (its decoder: 512 wide, 8 blocks).

    python benchmarks/federated_bytes.py [--models tiny-vit visionfm-cfp] [--rank 8]
"""

from __future__ import annotations

import argparse

from flwr.app import ArrayRecord

from retfm.federated.task import initial_weights
from retfm.models import spec
from retfm.pretrain.config import LoraOptions, PretrainConfig


def array_bytes(weights: dict) -> int:
    """Bytes of the arrays of a Flower ArrayRecord holding ``weights`` (what the report counts)."""
    return sum(len(array.data) for array in ArrayRecord(weights).values())


def measure(model: str, objective: str, lora: LoraOptions) -> dict:
    config = PretrainConfig.model_validate({"data": ["none"], "model": model, "objective": objective})
    row = {"model": model, "objective": objective}
    for params, adapters in (("full", None), ("lora", lora)):
        weights = initial_weights(config, adapters)[1]
        row[f"{params}_params"] = sum(w.numel() for w in weights.values())
        row[f"{params}_fp32"] = array_bytes(weights)
        row[f"{params}_fp16"] = array_bytes({k: w.half() for k, w in weights.items()})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-vit", "visionfm-cfp"])
    parser.add_argument("--objectives", nargs="+", default=["token-reconstruction", "mae"])
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    lora = LoraOptions(rank=args.rank)
    print(f"MB per site and round; site -> coordinator (the coordinator sends the fp32 column). LoRA rank "
          f"{lora.rank} on {', '.join(lora.targets)}.\n")
    print("| model | objective | trainable params | full fp32 | full fp16 | LoRA params | LoRA fp32 | LoRA fp16 | "
          "full fp32 / LoRA fp16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models:
        for objective in args.objectives:
            r = measure(model, objective, lora)
            print(f"| {model} ({spec(model).architecture}) | {objective} | {r['full_params']:,} | "
                  f"{r['full_fp32'] / 1e6:.3f} | {r['full_fp16'] / 1e6:.3f} | {r['lora_params']:,} | {r['lora_fp32'] / 1e6:.3f} | "
                  f"{r['lora_fp16'] / 1e6:.3f} | {r['full_fp32'] / r['lora_fp16']:.0f}x |")


if __name__ == "__main__":
    main()
