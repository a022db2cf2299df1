"""Fine-tuning step throughput and peak memory: full, LoRA and linear against a plain fine-tuning step, same run.

Models: ViT-S/16 and ViT-B/16 at 224 (timm), 5 classes, batch 16, in-memory batch (data loading left out). Each
variant runs in its own process so that its peak memory (max RSS on CPU, max allocated on CUDA) is its own.

- reference: the plain loop, ``timm.create_model(..., num_classes=5)``, ``torch.optim.AdamW`` over every
  parameter, cross-entropy;
- retfm full / lora / linear: ``retfm.adapt.finetune``'s model adaptation and optimiser (layer-wise decay for
  full, peft LoRA on qkv for lora, the head alone for linear), drop path 0.2 for full as in the recipe.

    python benchmarks/finetune.py [--steps 5] [--batch 16] [--models vit_small_patch16_224,vit_base_patch16_224]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import timm
import torch
from timing import time_steps

VARIANTS = ("reference", "full", "lora", "linear")


def run_variant(architecture: str, variant: str, steps: int, batch: int, device: str, precision: str) -> dict:
    from timm.optim import create_optimizer_v2

    from retfm.adapt.finetune import _adapt
    from retfm.adapt.config import FinetuneConfig

    torch.manual_seed(0)
    config = FinetuneConfig(data="unused", model="unused", label="unused",
                            adaptation=variant if variant != "reference" else "full")
    model = timm.create_model(architecture, num_classes=5,
                              drop_path_rate=config.drop_path if variant == "full" else 0.0)
    if variant == "reference":
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    else:
        model = _adapt(model, config)
        optimiser = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05,
                                        layer_decay=config.layer_decay if variant == "full" else None)
    model = model.to(device).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    images = torch.randn(batch, 3, 224, 224, device=device)
    targets = torch.randint(0, 5, (batch,), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), targets)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    return {**time_steps(step, steps, batch, device), "trainable_parameters": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--variant", choices=VARIANTS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.models, args.variant, args.steps, args.batch, args.device,
                                     args.precision)))
        return
    results = {"batch": args.batch, "device": args.device, "precision": args.precision, "cores": os.cpu_count(),
               "torch": torch.__version__}
    for architecture in args.models.split(","):
        rows = {}
        for variant in VARIANTS:
            run = subprocess.run([sys.executable, __file__, "--variant", variant, "--models", architecture,
                                  "--steps", str(args.steps), "--batch", str(args.batch), "--device", args.device,
                                  "--precision", args.precision], capture_output=True, text=True, check=True)
            rows[variant] = json.loads(run.stdout.strip().splitlines()[-1])
        for variant in VARIANTS[1:]:
            rows[variant]["speed_vs_reference"] = round(rows[variant]["images_per_s"] /
                                                        rows["reference"]["images_per_s"], 2)
            rows[variant]["memory_vs_reference"] = round(rows[variant]["peak_memory_mb"] /
                                                         rows["reference"]["peak_memory_mb"], 2)
        results[architecture] = rows
        print(architecture, json.dumps(rows), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
