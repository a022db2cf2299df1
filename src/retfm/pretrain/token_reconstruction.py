"""Token Reconstruction pretraining, as RETFound-Green was trained (Engelmann et al. 2024).

A frozen teacher sees the clean image and gives its final tokens. The student sees the image corrupted twice: in
pixels, by Gaussian noise, and in tokens, by a random share of its patch embeddings replaced with a mask token
before the position embeddings are added (so the student knows where the gaps are) and before the blocks. A small
residual projector maps each of the student's final tokens to the teacher's; the loss is the mean squared error
over every token, class and register tokens included, as in the authors' code.

Defaults follow the authors' training notebook (``Training_and_eval_code/TokenReconstructionPretraining.ipynb`` in
github.com/justinengelmann/RETFound_Green, read for this module): a masking ratio drawn per image from U(0, 1/3);
noise with a standard deviation of 0.2 times each image's own per-channel standard deviation; the projector
LayerNorm -> Linear(D, D) -> GELU -> Linear(D, D), added to the student's tokens through a LayerScale that starts
at 1e-5 (so the student starts as the teacher); the last image of every batch left uncorrupted; the teacher a
copy of the student's starting weights (there: DINOv2's ViT-S/14 with registers, at 392 px). Two departures: each
image hides exactly ``round(ratio * N)`` patches (the authors hide each patch independently with probability
``ratio``), and the mask token is trained (the authors' optimiser covers only the student and projector, so their
mask token stays at its zero start).

The teacher's weights are buffers, not parameters: ``state_dict`` saves them (a resume restores them) and ``.to()``
moves them, but no optimiser built from ``parameters()`` can see them. The teacher stays in eval mode whatever the
objective's mode. Noise and masks come from torch's global random number generator on the images' device.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from retfm.errors import RetfmError
from retfm.pretrain.mae import encode_tokens
from retfm.pretrain.sampling import BatchShard


class TokenReconstruction(nn.Module):
    """Token Reconstruction around a timm ``VisionTransformer`` student (kept, unchanged, as ``self.backbone``).

    ``teacher``: the frozen model whose tokens are the targets; default a copy of ``student`` as it is now. It must
    give as many tokens of the same width as the student. ``max_mask_ratio``: each image masks a share of its patch
    tokens drawn from U(0, max_mask_ratio). ``noise_std``: pixel noise, in units of each image's per-channel standard
    deviation. ``projector_hidden``: the projector's hidden width (default: the embedding width).
    ``layerscale_init``: the projector's starting scale. ``clean_last_sample``: the last image of each batch is
    neither noised nor masked.

    ``forward(images)`` returns ``loss`` (scalar) and ``mask`` (B x N, 1 = patch token replaced; detached)."""

    def __init__(self, student: VisionTransformer, teacher: VisionTransformer | None = None,
                 max_mask_ratio: float = 1 / 3, noise_std: float = 0.2, projector_hidden: int | None = None,
                 layerscale_init: float = 1e-5, clean_last_sample: bool = True):
        super().__init__()
        self.shard = BatchShard()  # the trainer sets this process's rows of a data-parallel batch
        if not 0 <= max_mask_ratio <= 1:
            raise RetfmError(f"token reconstruction: max_mask_ratio {max_mask_ratio} is not between 0 and 1")
        if noise_std < 0:
            raise RetfmError(f"token reconstruction: noise_std {noise_std} is negative")
        teacher = _frozen_copy(teacher if teacher is not None else student)
        tokens = (student.embed_dim, student.num_prefix_tokens, student.patch_embed.num_patches)
        teacher_tokens = (teacher.embed_dim, teacher.num_prefix_tokens, teacher.patch_embed.num_patches)
        if teacher_tokens != tokens:
            raise RetfmError("token reconstruction: the teacher gives (width, prefix tokens, patches) "
                             f"{teacher_tokens}, the student {tokens}; they must match")
        self.backbone = student
        self.teacher = teacher
        self.max_mask_ratio = max_mask_ratio
        self.noise_std = noise_std
        self.clean_last_sample = clean_last_sample
        width = student.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.projector = nn.Sequential(nn.LayerNorm(width), Mlp(width, projector_hidden or width),
                                       LayerScale(width, init_values=layerscale_init))

    def train(self, mode: bool = True) -> TokenReconstruction:
        super().train(mode)
        self.teacher.eval()  # the targets must not depend on the mode (dropout, drop-path)
        return self

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        teacher = self.teacher
        with torch.no_grad():
            target = encode_tokens(teacher, teacher._pos_embed(teacher.patch_embed(images)))
        student = self.backbone
        x = student.patch_embed(images + self.noise(images))
        mask = self.random_mask(x.shape[:-1], images.device)  # B x N, or B x H x W for dynamic-size backbones
        x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        tokens = encode_tokens(student, student._pos_embed(x))
        pred = tokens + self.projector(tokens)
        return {"loss": F.mse_loss(pred.float(), target.float()), "mask": mask.flatten(1).float()}

    def noise(self, images: Tensor) -> Tensor:
        """Gaussian pixel noise, ``noise_std`` times each image's per-channel standard deviation."""
        noise = self.shard.randn(*images.shape, device=images.device, dtype=images.dtype)
        noise = noise * (self.noise_std * images.std(dim=(2, 3), keepdim=True))
        if self.clean_last_sample and self.shard.holds_last:
            noise[-1] = 0
        return noise

    def random_mask(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
        """A boolean mask over patch tokens (batch first), True where the mask token goes: each image hides
        exactly ``round(ratio * N)`` tokens for its own ratio from U(0, max_mask_ratio)."""
        shape = torch.Size(shape)
        b, n = shape[0], shape[1:].numel()
        hidden = (self.shard.rand(b, 1, device=device) * (self.max_mask_ratio * n)).round()
        rank = self.shard.rand(b, n, device=device).argsort(dim=1).argsort(dim=1)
        mask = rank < hidden
        if self.clean_last_sample and self.shard.holds_last:
            mask[-1] = False
        return mask.reshape(shape)


def _frozen_copy(model: VisionTransformer) -> VisionTransformer:
    """A copy of ``model`` in eval mode whose parameters are buffers: saved and moved with the objective, never
    trained."""
    frozen = copy.deepcopy(model).eval()
    for module in frozen.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, param.detach())
    return frozen
