"""Token Reconstruction pretraining, as RETFound-Green was trained (Engelmann et al. 2024), for any pair of
student and teacher architectures.

A frozen teacher sees the clean image and gives its final features. The student sees the image corrupted twice: in
pixels, by Gaussian noise, and by hiding a random share of its patches. A small projector maps the student's final
features to the teacher's; the loss is their mean squared error.

Two layouts:

- **tokens** (a ViT student and a ViT teacher with the same tokens: width, prefix tokens, patches; RETFound-Green's
  own case): a share of the student's patch embeddings is replaced with a mask token before the position embeddings
  are added (so the student knows where the gaps are) and before the blocks. The projector is residual; the loss
  covers every token, class and register tokens included, as in the authors' code.
- **grid** (any other pair, e.g. an ImageNet CNN teacher and a ViT student, or a CNN taught by itself): the target
  is the teacher's final feature grid (a CNN's last feature map, a ViT's patch tokens laid out on its patch grid),
  resampled to the student's grid (area-averaged when larger, bilinear when smaller). A ViT student is masked as
  above. A CNN student, which has no tokens, has square image patches of side ``mask_patch`` (default: its output
  stride, so one hidden patch is one cell of its feature grid) replaced by a learned colour (``mask_token``, three
  values in normalised pixel space, starting at 0: the dataset mean). The projector is residual when the widths
  agree and the student starts as its teacher (the same tensors: it starts at a loss near zero), and a plain MLP to
  the teacher's width otherwise (another network's features are mapped, not copied: with a residual projector an
  ImageNet Lite0 taught by the ImageNet Lite2 was pushed to become Lite2 and kept 23 live features of 1280); the
  loss covers every cell of the grid.

Defaults follow the authors' training notebook (``Training_and_eval_code/TokenReconstructionPretraining.ipynb`` in
github.com/justinengelmann/RETFound_Green, read for this module): a masking ratio drawn per image from U(0, 1/3);
noise with a standard deviation of 0.2 times each image's own per-channel standard deviation; the projector
LayerNorm -> Linear(D, D) -> GELU -> Linear(D, D), added to the student's tokens through a LayerScale that starts
at 1e-5 (so the student starts as the teacher); the last image of every batch left uncorrupted; the teacher a
copy of the student's starting weights (there: DINOv2's ViT-S/14 with registers, at 392 px). Two departures: each
image hides exactly ``round(ratio * N)`` patches (the authors hide each patch independently with probability
``ratio``), and the mask token is trained (the authors' optimiser covers only the student and projector, so their
mask token stays at its zero start).

Normalisation layers: a student's BatchNorm statistics are frozen by default (``freeze_norm_stats``): it normalises
with its running statistics and trains only its scales and shifts, so an image's features do not depend on which
other images share its batch (a data-parallel run then equals one process with the whole batch).

The teacher's weights are buffers, not parameters: ``state_dict`` saves them (a resume restores them) and ``.to()``
moves them, but no optimiser built from ``parameters()`` can see them. The teacher stays in eval mode whatever the
objective's mode. A teacher trained with another normalisation than the student's gets the images renormalised
(``teacher_normalisation``: the student's and the teacher's (mean, std)). Noise and masks come from torch's global
random number generator on the images' device.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from retfm.errors import RetfmError
from retfm.pretrain.mae import encode_tokens
from retfm.pretrain.sampling import BatchShard

Normalisation = tuple[tuple[float, ...], tuple[float, ...]]


class TokenReconstruction(nn.Module):
    """Token Reconstruction around a timm student (kept, unchanged, as ``self.backbone``): a ViT or a CNN.

    ``teacher``: the frozen model whose features are the targets; default a copy of ``student`` as it is now.
    ``max_mask_ratio``: each image masks a share of its patches drawn from U(0, max_mask_ratio). ``noise_std``:
    pixel noise, in units of each image's per-channel standard deviation. ``projector_hidden``: the projector's
    hidden width (default: the student's width). ``layerscale_init``: a residual projector's starting scale.
    ``clean_last_sample``: the last image of each batch is neither noised nor masked. ``mask_patch``: a CNN
    student's masked square, in pixels (default: its output stride). ``freeze_norm_stats``: the student's BatchNorm
    layers keep their running statistics. ``teacher_normalisation``: ((student mean, std), (teacher mean, std))
    when they differ.

    ``forward(images)`` returns ``loss`` (scalar) and ``mask`` (B x N, 1 = patch hidden; detached)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, max_mask_ratio: float = 1 / 3,
                 noise_std: float = 0.2, projector_hidden: int | None = None, layerscale_init: float = 1e-5,
                 clean_last_sample: bool = True, mask_patch: int | None = None, freeze_norm_stats: bool = True,
                 teacher_normalisation: tuple[Normalisation, Normalisation] | None = None):
        super().__init__()
        self.shard = BatchShard()  # the trainer sets this process's rows of a data-parallel batch
        if not 0 <= max_mask_ratio <= 1:
            raise RetfmError(f"token reconstruction: max_mask_ratio {max_mask_ratio} is not between 0 and 1")
        if noise_std < 0:
            raise RetfmError(f"token reconstruction: noise_std {noise_std} is negative")
        teacher = _frozen_copy(teacher if teacher is not None else student)
        self.backbone = student
        self.teacher = teacher
        self.max_mask_ratio = max_mask_ratio
        self.noise_std = noise_std
        self.clean_last_sample = clean_last_sample
        self.freeze_norm_stats = freeze_norm_stats
        self.layout = "tokens" if _is_vit(student) and _token_layout(student) == _token_layout(teacher) else "grid"
        width, target_width = _width(student), _width(teacher)
        if _is_vit(student):
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
            self.mask_patch = None
        else:
            self.mask_token = nn.Parameter(torch.zeros(1, 3, 1, 1))
            self.mask_patch = mask_patch or _stride(student)
        self.residual = width == target_width and _same_tensors(student, teacher)  # the student starts as it
        if self.residual:
            self.projector = nn.Sequential(nn.LayerNorm(width), Mlp(width, projector_hidden or width),
                                           LayerScale(width, init_values=layerscale_init))
        else:
            self.projector = nn.Sequential(nn.LayerNorm(width), Mlp(width, projector_hidden or width, target_width))
        scale, shift = torch.ones(1, 3, 1, 1), torch.zeros(1, 3, 1, 1)
        if teacher_normalisation is not None:  # x_teacher = (x * std_s + mean_s - mean_t) / std_t
            (mean_s, std_s), (mean_t, std_t) = (tuple(torch.tensor(v).view(1, 3, 1, 1) for v in pair)
                                                for pair in teacher_normalisation)
            scale, shift = std_s / std_t, (mean_s - mean_t) / std_t
        self.register_buffer("teacher_scale", scale, persistent=False)
        self.register_buffer("teacher_shift", shift, persistent=False)

    def train(self, mode: bool = True) -> TokenReconstruction:
        super().train(mode)
        self.teacher.eval()  # the targets must not depend on the mode (dropout, drop-path)
        if self.freeze_norm_stats:
            for module in self.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            target = _features(self.teacher, images * self.teacher_scale + self.teacher_shift, self.layout)
        noisy = images + self.noise(images)
        if self.mask_patch is None:  # a ViT: mask tokens among the patch embeddings
            student = self.backbone
            x = student.patch_embed(noisy)
            mask = self.random_mask(x.shape[:-1], images.device)  # B x N, or B x H x W for dynamic-size backbones
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
            features = _from_tokens(student, encode_tokens(student, student._pos_embed(x)), self.layout,
                                    images.shape[-2:])
        else:  # a CNN: mask square patches of the image
            b, _, h, w = images.shape
            grid = (-(-h // self.mask_patch), -(-w // self.mask_patch))
            mask = self.random_mask((b, *grid), images.device)
            pixels = mask.repeat_interleave(self.mask_patch, 1).repeat_interleave(self.mask_patch, 2)[:, None, :h, :w]
            features = self.backbone.forward_features(torch.where(pixels, self.mask_token.to(noisy.dtype), noisy))
        if self.layout == "grid":
            target = _resampled(target, features.shape[-2:])
            features, target = features.flatten(2).transpose(1, 2), target.flatten(2).transpose(1, 2)
        projected = self.projector(features)
        pred = features + projected if self.residual else projected
        return {"loss": F.mse_loss(pred.float(), target.float()), "mask": mask.flatten(1).float()}

    def noise(self, images: Tensor) -> Tensor:
        """Gaussian pixel noise, ``noise_std`` times each image's per-channel standard deviation."""
        noise = self.shard.randn(*images.shape, device=images.device, dtype=images.dtype)
        noise = noise * (self.noise_std * images.std(dim=(2, 3), keepdim=True))
        if self.clean_last_sample and self.shard.holds_last:
            noise[-1] = 0
        return noise

    def random_mask(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
        """A boolean mask over patches (batch first), True where the patch is hidden: each image hides exactly
        ``round(ratio * N)`` patches for its own ratio from U(0, max_mask_ratio)."""
        shape = torch.Size(shape)
        b, n = shape[0], shape[1:].numel()
        hidden = (self.shard.rand(b, 1, device=device) * (self.max_mask_ratio * n)).round()
        rank = self.shard.rand(b, n, device=device).argsort(dim=1).argsort(dim=1)
        mask = rank < hidden
        if self.clean_last_sample and self.shard.holds_last:
            mask[-1] = False
        return mask.reshape(shape)


def _is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def _token_layout(model: nn.Module) -> tuple[int, int, int] | None:
    return (model.embed_dim, model.num_prefix_tokens, model.patch_embed.num_patches) if _is_vit(model) else None


def _width(model: nn.Module) -> int:
    return model.embed_dim if _is_vit(model) else model.num_features


def _stride(model: nn.Module) -> int:
    return model.feature_info[-1]["reduction"]


def _features(model: nn.Module, images: Tensor, layout: str) -> Tensor:
    """A model's final features: its tokens (tokens layout) or its feature grid (B x C x H x W)."""
    if _is_vit(model):
        tokens = encode_tokens(model, model._pos_embed(model.patch_embed(images)))
        return _from_tokens(model, tokens, layout, images.shape[-2:])
    return model.forward_features(images)


def _from_tokens(model: nn.Module, tokens: Tensor, layout: str, image_size: torch.Size) -> Tensor:
    """Every token (tokens layout), or the patch tokens laid out on the patch grid (B x C x H x W)."""
    if layout == "tokens":
        return tokens
    h, w = model.patch_embed.dynamic_feat_size(tuple(image_size))
    return tokens[:, model.num_prefix_tokens:].transpose(1, 2).reshape(len(tokens), -1, h, w)


def _resampled(grid: Tensor, size: torch.Size) -> Tensor:
    """A feature grid at another size: area-averaged down, bilinear up."""
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    if grid.shape[-2] >= size[0] and grid.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(grid, size)
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)


def _same_tensors(model: nn.Module, other: nn.Module) -> bool:
    """Whether two models hold the same tensors under the same names (a student that starts as its teacher)."""
    mine, theirs = model.state_dict(), other.state_dict()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]) for k in mine)


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose parameters are buffers: saved and moved with the objective, never
    trained."""
    frozen = copy.deepcopy(model).eval()
    for module in frozen.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, param.detach())
    return frozen
