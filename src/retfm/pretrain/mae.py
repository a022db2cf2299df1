"""Masked autoencoder (MAE) pretraining, as RETFound was pretrained (He et al. 2022; Zhou et al., Nature 2023).

Each image loses a random ``mask_ratio`` of its patches; the backbone encodes the rest together with its class and
register tokens, and a light decoder, which sees the encoded tokens and a learned mask token at every hidden
position, predicts the hidden patches' pixels. The loss is the mean squared error on the hidden patches alone,
against pixels normalised per patch when ``norm_pix_loss`` (MAE's and RETFound's choice).

The backbone's own modules do the encoding (:func:`encode_tokens`), so any timm ``VisionTransformer`` works:
with or without a class token, with register tokens, with position embeddings that do or do not cover the prefix
tokens (timm's ``_pos_embed`` handles every layout). Masks come from torch's global random number generator on the
images' device: ``torch.manual_seed`` (or restoring the RNG state, as the trainer does on resume) repeats them.
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm, build_sincos2d_pos_embed, to_2tuple
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from retfm.errors import RetfmError
from retfm.pretrain.sampling import BatchShard


def patchify(images: Tensor, patch_size: int | tuple[int, int]) -> Tensor:
    """B x C x H x W images -> B x N x (ph * pw * C) patches, in the backbone's token order (row by row), each
    patch flattened as (row, column, channel) as in MAE."""
    ph, pw = to_2tuple(patch_size)
    b, c, h, w = images.shape
    if h % ph or w % pw:
        raise RetfmError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
    x = images.reshape(b, c, h // ph, ph, w // pw, pw)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // ph) * (w // pw), ph * pw * c)


def unpatchify(patches: Tensor, patch_size: int | tuple[int, int], grid_size: tuple[int, int]) -> Tensor:
    """The inverse of :func:`patchify`: B x N x (ph * pw * C) patches on a grid_size (rows, columns) grid -> images."""
    ph, pw = to_2tuple(patch_size)
    gh, gw = grid_size
    b = patches.shape[0]
    x = patches.reshape(b, gh, gw, ph, pw, -1)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, -1, gh * ph, gw * pw)


def token_norm(backbone: VisionTransformer) -> nn.Module:
    """The norm on the backbone's final tokens. A backbone that pools before normalising (``fc_norm``, RETFound's
    fine-tuning layout) has no ``norm``; its ``fc_norm`` takes that part, just as retfm loads a RETFound MAE
    encoder's final norm into ``fc_norm``, so what pretraining trains is what loading expects."""
    return backbone.fc_norm if isinstance(backbone.norm, nn.Identity) else backbone.norm


def encode_tokens(backbone: VisionTransformer, tokens: Tensor) -> Tensor:
    """The backbone's transformer on embedded tokens (prefix tokens and position embeddings already in), ending
    with the final norm on every token. Honours the backbone's gradient checkpointing, as timm's own forward does."""
    x = backbone.norm_pre(tokens)
    if backbone.grad_checkpointing and torch.is_grad_enabled():
        x = checkpoint_seq(backbone.blocks, x)
    else:
        x = backbone.blocks(x)
    return token_norm(backbone)(x)


class MAE(nn.Module):
    """MAE around a timm ``VisionTransformer`` (kept, unchanged, as ``self.backbone``).

    ``forward(images)`` (images at the backbone's input size) returns ``loss`` (scalar), ``mask`` (B x N, 1 = hidden
    patch) and ``pred`` (B x N x patch_size**2 * 3 predicted pixels, in :func:`patchify` layout, normalised per patch
    when ``norm_pix_loss``); the last two are detached. Each image hides exactly ``N - int(N * (1 - mask_ratio))``
    patches (MAE's rounding). The decoder (embedding, mask token, fixed 2D sin-cos position table, ``decoder_depth``
    timm ``Block``\\ s, norm, pixel head) is MAE's; prefix tokens pass through it with no position embedding, as
    MAE's class token does."""

    def __init__(self, backbone: VisionTransformer, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True):
        super().__init__()
        self.shard = BatchShard()  # the trainer sets this process's rows of a data-parallel batch
        patch_embed = backbone.patch_embed
        grid = patch_embed.grid_size
        if any(size % patch for size, patch in zip(patch_embed.img_size, patch_embed.patch_size)):
            raise RetfmError(f"MAE: image size {patch_embed.img_size} is not a multiple of the patch size "
                             f"{patch_embed.patch_size}")
        num_patches = grid[0] * grid[1]
        self.num_visible = int(num_patches * (1 - mask_ratio))
        if not 0 < self.num_visible < num_patches:
            raise RetfmError(f"MAE: mask_ratio {mask_ratio} leaves {self.num_visible} of {num_patches} patches "
                             "visible; it must hide some and keep some")
        if decoder_dim % decoder_heads or decoder_dim % 4:
            raise RetfmError(f"MAE: decoder_dim {decoder_dim} must be a multiple of decoder_heads ({decoder_heads}) "
                             "and of 4 (the 2D sin-cos position table)")
        self.backbone = backbone
        self.norm_pix_loss = norm_pix_loss

        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # A constant of the grid, so not saved: the decoder's weights are all a checkpoint needs.
        self.register_buffer("decoder_pos_embed", build_sincos2d_pos_embed(list(grid), decoder_dim)[None],
                             persistent=False)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, patch_embed.patch_size[0] * patch_embed.patch_size[1]
                                      * patch_embed.proj.in_channels)
        # MAE's initialisation of the decoder; the backbone keeps timm's (or its loaded weights).
        nn.init.normal_(self.mask_token, std=0.02)
        for part in (self.decoder_embed, self.decoder_blocks, self.decoder_pred):
            for layer in part.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        latent, mask, restore = self.encode(images)
        pred = self.decode(latent, restore)
        return {"loss": self.loss(images, pred, mask), "mask": mask, "pred": pred.detach()}

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encode a random ``num_visible`` patches of each image. Returns the final tokens (prefix tokens first,
        then the visible patches in shuffled order), the mask (B x N, 1 = hidden) and the permutation that puts
        shuffled patches back in place."""
        backbone = self.backbone
        tokens = backbone._pos_embed(backbone.patch_embed(images))  # before the shuffle: positions travel along
        prefix, patches = tokens[:, :backbone.num_prefix_tokens], tokens[:, backbone.num_prefix_tokens:]
        b, n, d = patches.shape
        shuffle = self.shard.rand(b, n, device=images.device).argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        visible = torch.gather(patches, 1, shuffle[:, :self.num_visible, None].expand(-1, -1, d))
        latent = encode_tokens(backbone, torch.cat([prefix, visible], dim=1))
        mask = (restore >= self.num_visible).float()  # a patch is hidden when shuffled past the visible ones
        return latent, mask, restore

    def decode(self, latent: Tensor, restore: Tensor) -> Tensor:
        """Predicted pixels of every patch (B x N x ph * pw * C), from the encoded tokens and the mask token."""
        num_prefix = self.backbone.num_prefix_tokens
        x = self.decoder_embed(latent)
        prefix, visible = x[:, :num_prefix], x[:, num_prefix:]
        b, n = restore.shape
        patches = torch.cat([visible, self.mask_token.expand(b, n - visible.shape[1], -1)], dim=1)
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([prefix, patches + self.decoder_pos_embed], dim=1)
        return self.decoder_pred(self.decoder_norm(self.decoder_blocks(x))[:, num_prefix:])

    def targets(self, images: Tensor) -> Tensor:
        """The pixels the decoder learns to predict (:func:`patchify` layout), normalised per patch to zero mean and
        unit variance when ``norm_pix_loss``."""
        target = patchify(images.float(), self.backbone.patch_embed.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over the hidden patches only (``mask`` = 1); visible patches count for nothing."""
        per_patch = ((pred.float() - self.targets(images)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()
