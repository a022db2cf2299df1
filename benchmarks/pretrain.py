"""Pretraining step throughput and peak memory: retfm's objectives against a plain eager MAE step, same run.

Model: ViT-S/16 at 224 (timm ``vit_small_patch16_224``), MAE decoder 8 x 512 (RETFound's), mask ratio 0.75,
batch 16, AdamW. Each variant runs in its own process so that peak memory (max RSS on CPU, max allocated on
CUDA) is its own. Data loading is left out: every variant trains on the same in-memory batch.

- reference: a plain MAE step written the way the MAE paper's code reads (timm ``Block`` decoder, masking by
  argsort of noise, MSE on masked patches with normalised pixel targets), ``torch.optim.AdamW`` defaults;
- retfm mae / token-reconstruction: ``retfm.pretrain`` objectives with the trainer's optimiser set-up
  (weight-decay groups, fused AdamW where torch has it).

    python benchmarks/pretrain.py [--steps 8] [--batch 16] [--device cpu|cuda] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from timing import time_steps
from timm.models.vision_transformer import Block

VARIANTS = ("reference", "mae", "token-reconstruction")


class ReferenceMAE(torch.nn.Module):
    def __init__(self, encoder, decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75):
        super().__init__()
        self.encoder, self.mask_ratio = encoder, mask_ratio
        width, patches, patch = encoder.embed_dim, encoder.patch_embed.num_patches, encoder.patch_embed.patch_size[0]
        self.patch = patch
        self.decoder_embed = torch.nn.Linear(width, decoder_dim)
        self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = torch.nn.Parameter(torch.zeros(1, patches + 1, decoder_dim), requires_grad=False)
        self.decoder = torch.nn.Sequential(*[Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = torch.nn.LayerNorm(decoder_dim)
        self.decoder_pred = torch.nn.Linear(decoder_dim, patch * patch * 3)

    def forward(self, images):
        e = self.encoder
        x = e.patch_embed(images) + e.pos_embed[:, 1:]
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        shuffle = torch.rand(b, n).argsort(1)
        restore = shuffle.argsort(1)
        x = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
        cls = (e.cls_token + e.pos_embed[:, :1]).expand(b, -1, -1)
        x = e.norm(e.blocks(torch.cat([cls, x], 1)))
        x = self.decoder_embed(x)
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(b, n - keep, -1)], 1)
        tokens = torch.gather(tokens, 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = self.decoder(torch.cat([x[:, :1], tokens], 1) + self.decoder_pos)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        p = self.patch
        target = images.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 4, 5, 1).reshape(b, n, -1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        mask = torch.ones(b, n)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        return {"loss": (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()}


def run_variant(variant: str, steps: int, batch: int, device: str, precision: str) -> dict:
    import timm

    from retfm.pretrain.config import PretrainConfig
    from retfm.pretrain.trainer import build_objective, build_optimiser

    torch.manual_seed(0)
    encoder = timm.create_model("vit_small_patch16_224", num_classes=0, global_pool="avg", fc_norm=True)
    if variant == "reference":
        model = ReferenceMAE(encoder).to(device)
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    else:
        config = PretrainConfig(objective=variant, data=["unused"], model="retfound-mae-cfp")
        model = build_objective(config, encoder).to(device)
        optimiser = build_optimiser(model, config, lr=1e-4, device=torch.device(device))
    model.train()
    images = torch.randn(batch, 3, 224, 224, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            loss = model(images)["loss"]
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    return time_steps(step, steps, batch, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--variant", choices=VARIANTS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.batch, args.device, args.precision)))
        return
    results = {"model": "vit_small_patch16_224", "batch": args.batch, "device": args.device,
               "precision": args.precision, "cores": os.cpu_count(), "torch": torch.__version__}
    for variant in VARIANTS:
        run = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--device", args.device, "--precision", args.precision],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(run.stdout.strip().splitlines()[-1])
    reference = results["reference"]["images_per_s"]
    for variant in VARIANTS[1:]:
        results[variant]["speed_vs_reference"] = round(results[variant]["images_per_s"] / reference, 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
