"""The pretraining objectives, MAE (RETFound) and Token Reconstruction (RETFound-Green), on tiny random ViTs: one
with a class token whose position embedding covers it (``tiny-vit``), one with a class token and 4 registers
outside the position embedding (``tiny-vit-reg``)."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

from retfm.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from retfm.data.phantoms import render_fundus, site_profiles
from retfm.errors import RetfmError
from retfm.models import create, save_checkpoint, spec
from retfm.pretrain.mae import MAE, patchify, unpatchify
from retfm.pretrain.token_reconstruction import TokenReconstruction

SIZES = {"tiny-vit": 64, "tiny-vit-reg": 56}  # both 4 x 4 patches
TINY_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}
OBJECTIVES = ("mae", "token-reconstruction")
STEPS, LR = 30, 1e-3
# Loss after STEPS AdamW steps on a fixed batch / loss before, with the same masks and noise (seeded). Measured:
# MAE 0.54-0.56, token reconstruction 0.10-0.21; the bounds leave room for other CPUs and library versions.
MAX_LOSS_RATIO = {"mae": 0.75, "token-reconstruction": 0.5}


@functools.cache
def _phantoms(size: int, n: int) -> torch.Tensor:
    site = site_profiles(1, seed=0)[0]
    images = [render_fundus(np.random.default_rng(i), size, eye="LR"[i % 2], dr_grade=i % 5, cdr=0.3 + 0.1 * (i % 4),
                            amd=i % 3 == 0, site=site)[0] for i in range(n)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def phantoms(name: str, n: int = 8) -> torch.Tensor:
    """n phantom fundus photographs at the model's input size, normalised as it expects."""
    return _phantoms(SIZES[name], n).clone()


def make(objective: str, name: str, **options) -> MAE | TokenReconstruction:
    torch.manual_seed(0)
    backbone = create(name, weights="random")
    if objective == "mae":
        return MAE(backbone, **{**TINY_DECODER, **options}).train()
    return TokenReconstruction(backbone, **options).train()


def seeded_loss(objective: torch.nn.Module, images: torch.Tensor, seed: int = 123) -> float:
    torch.manual_seed(seed)
    with torch.no_grad():
        return float(objective(images)["loss"])


def train(objective: torch.nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """Loss before and after STEPS AdamW steps over ``objective.parameters()``, measured with the same seed."""
    before = seeded_loss(objective, images)
    optimiser = torch.optim.AdamW(objective.parameters(), lr=LR)
    torch.manual_seed(0)
    for _ in range(STEPS):
        loss = objective(images)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return before, seeded_loss(objective, images)


def test_patchify_round_trip_and_layout():
    images = torch.randn(2, 3, 32, 48)
    patches = patchify(images, 16)
    assert patches.shape == (2, 6, 16 * 16 * 3)
    # Row by row over the 2 x 3 grid, each patch as (row, column, channel).
    assert torch.equal(patches[:, 4], images[:, :, 16:32, 16:32].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(unpatchify(patches, 16, (2, 3)), images)
    with pytest.raises(RetfmError, match="not a multiple of the patch size"):
        patchify(torch.zeros(1, 3, 30, 32), 16)


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("mask_ratio, hidden", [(0.75, 12), (0.6, 10)])  # of 16 patches: keep int(16 * (1 - r))
def test_mae_outputs_and_exact_mask_ratio(name, mask_ratio, hidden):
    objective = make("mae", name, mask_ratio=mask_ratio)
    patch = objective.backbone.patch_embed.patch_size[0]
    out = objective(phantoms(name))
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["mask"].shape == (8, 16) and out["pred"].shape == (8, 16, patch * patch * 3)
    assert not out["mask"].requires_grad and not out["pred"].requires_grad
    assert out["mask"].sum(dim=1).tolist() == [hidden] * 8
    assert len({tuple(row.tolist()) for row in out["mask"]}) == 8  # each image draws its own mask


@pytest.mark.parametrize("name", SIZES)
def test_mae_loss_counts_hidden_patches_only(name):
    objective = make("mae", name)
    images = phantoms(name)
    torch.manual_seed(1)
    out = objective(images)
    pred, mask = out["pred"].clone().requires_grad_(), out["mask"]
    loss = objective.loss(images, pred, mask)
    assert torch.equal(loss, out["loss"].detach())

    noise = 100 * torch.randn_like(pred)
    assert torch.equal(objective.loss(images, pred + noise * (1 - mask)[..., None], mask), loss)
    assert objective.loss(images, pred + noise * mask[..., None], mask) > 10 * loss

    loss.backward()
    per_patch = pred.grad.abs().sum(dim=-1)
    assert per_patch[mask == 0].max() == 0 and per_patch[mask == 1].min() > 0


def test_norm_pix_targets_are_standardised_per_patch():
    images = torch.randn(4, 3, 64, 64) * 3 + 1
    targets = make("mae", "tiny-vit").targets(images)
    assert targets.shape == (4, 16, 16 * 16 * 3)
    torch.testing.assert_close(targets.mean(dim=-1), torch.zeros(4, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(targets.var(dim=-1), torch.ones(4, 16), atol=1e-5, rtol=0)
    assert torch.equal(make("mae", "tiny-vit", norm_pix_loss=False).targets(images), patchify(images, 16))


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("kind", OBJECTIVES)
def test_loss_falls_on_phantoms(kind, name):
    before, after = train(make(kind, name), phantoms(name))
    assert after < MAX_LOSS_RATIO[kind] * before, (before, after)


@pytest.mark.parametrize("name", SIZES)
def test_token_reconstruction_teacher_stays_frozen_while_student_learns(name):
    objective = make("token-reconstruction", name)
    teacher = {k: v.clone() for k, v in objective.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in objective.backbone.state_dict().items()}
    assert teacher.keys() == student.keys()
    assert all(torch.equal(teacher[k], student[k]) for k in student)  # the default teacher: the starting student
    assert list(objective.teacher.parameters()) == []  # so no optimiser built from parameters() sees it
    assert not objective.teacher.training and objective.training

    train(objective, phantoms(name))
    assert all(torch.equal(v, teacher[k]) for k, v in objective.teacher.state_dict().items())
    assert any(not torch.equal(v, student[k]) for k, v in objective.backbone.state_dict().items())

    resumed = make("token-reconstruction", name)  # the state dict carries the teacher, for resumes
    resumed.load_state_dict(objective.state_dict())
    assert all(torch.equal(v, teacher[k]) for k, v in resumed.teacher.state_dict().items())


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("kind", OBJECTIVES)
def test_gradients_reach_every_backbone_weight_and_head_but_no_teacher(kind, name):
    objective = make(kind, name)
    objective(phantoms(name))["loss"].backward()
    for param_name, param in objective.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name
    if kind == "token-reconstruction":
        assert {n.split(".")[0] for n, _ in objective.named_parameters()} == {"backbone", "mask_token", "projector"}
        assert all(not buffer.requires_grad and buffer.grad is None for buffer in objective.teacher.buffers())


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_same_seed_same_loss(kind):
    objective, images = make(kind, "tiny-vit-reg"), phantoms("tiny-vit-reg")
    assert seeded_loss(objective, images, seed=5) == seeded_loss(objective, images, seed=5)
    assert seeded_loss(objective, images, seed=5) != seeded_loss(objective, images, seed=6)


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_gradient_checkpointing_changes_nothing(kind):
    plain, checkpointed = make(kind, "tiny-vit"), make(kind, "tiny-vit")
    checkpointed.backbone.set_grad_checkpointing()
    for objective in (plain, checkpointed):
        torch.manual_seed(3)
        objective(phantoms("tiny-vit"))["loss"].backward()
    for (param_name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=param_name)


@pytest.mark.parametrize("name", SIZES)
@pytest.mark.parametrize("kind", OBJECTIVES)
def test_backbone_saves_as_plain_registry_model(kind, name, tmp_path):
    objective = make(kind, name)
    train_step = torch.optim.SGD(objective.parameters(), lr=0.1)
    objective(phantoms(name))["loss"].backward()
    train_step.step()
    state = objective.backbone.state_dict()
    assert state.keys() == create(name, weights="random").state_dict().keys()

    path = save_checkpoint(objective.backbone, spec(name), tmp_path / "model.safetensors", objective=kind)
    loaded = create(path).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_token_reconstruction_corruption():
    objective = make("token-reconstruction", "tiny-vit", max_mask_ratio=0.5)
    torch.manual_seed(0)
    mask = objective.random_mask((256, 16))
    torch.manual_seed(0)
    drawn = (torch.rand(256) * 0.5 * 16).round()  # each image hides round(ratio * N) for its ratio ~ U(0, 0.5)
    hidden = mask.sum(dim=1).float()
    assert torch.equal(hidden[:-1], drawn[:-1]) and hidden[-1] == 0  # the last image stays clean
    assert set(hidden.tolist()) == set(range(9))

    images = phantoms("tiny-vit")
    noise = objective.noise(images)
    assert noise[-1].abs().max() == 0
    ratio = noise[:-1].std(dim=(2, 3)) / images[:-1].std(dim=(2, 3))
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.2), atol=0.02, rtol=0)

    everyone = make("token-reconstruction", "tiny-vit", clean_last_sample=False)
    torch.manual_seed(0)
    assert everyone.random_mask((256, 16)).sum(dim=1)[-1] > 0 and everyone.noise(images)[-1].abs().max() > 0


def test_token_reconstruction_masks_before_position_embedding():
    objective = make("token-reconstruction", "tiny-vit-reg")  # position embeddings cover the patches only
    with torch.no_grad():
        objective.mask_token.normal_()
    seen = []
    objective.backbone.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = objective(phantoms("tiny-vit-reg"))
    patches, mask = seen[0][:, objective.backbone.num_prefix_tokens:], out["mask"].bool()
    expected = (objective.mask_token + objective.backbone.pos_embed)[0].expand_as(patches)
    assert mask.any()
    torch.testing.assert_close(patches[mask], expected[mask])  # the student knows where each gap is
    assert (patches[~mask] - expected[~mask]).abs().amax(dim=-1).min() > 1e-3


def test_invalid_options_are_one_line_errors():
    backbone = create("tiny-vit", weights="random")
    for options in ({"mask_ratio": 1.0}, {"mask_ratio": 0.0}, {"decoder_dim": 30, "decoder_heads": 3}):
        with pytest.raises(RetfmError, match="^MAE: "):
            MAE(backbone, **options)
    with pytest.raises(RetfmError, match="max_mask_ratio"):
        TokenReconstruction(backbone, max_mask_ratio=1.5)


# ---- token reconstruction across architectures ------------------------------------------------------------------

def _cnn_images(n: int = 8) -> torch.Tensor:
    return _phantoms(64, n).clone()  # cnn-demo's input size


def test_a_cnn_taught_by_itself_starts_as_its_teacher_and_learns_to_fill_masked_patches():
    torch.manual_seed(0)
    student = create("cnn-demo", weights="random")
    objective = TokenReconstruction(student, max_mask_ratio=0.5).train()
    assert objective.layout == "grid" and objective.residual and objective.mask_patch == 32  # resnet10t: stride 32
    images = _cnn_images()
    clean = TokenReconstruction(create("cnn-demo", weights="random"), max_mask_ratio=0, noise_std=0).train()
    clean.backbone.load_state_dict(student.state_dict())
    clean.teacher.load_state_dict(student.state_dict())
    assert seeded_loss(clean, images) < 1e-6  # nothing hidden, no noise: the student is the teacher
    before, after = train(objective, images)
    assert after < 0.5 * before, (before, after)
    assert {n.split(".")[0] for n, _ in objective.named_parameters()} == {"backbone", "mask_token", "projector"}


def test_a_cnn_student_sees_its_hidden_patches_filled_with_the_mask_colour():
    objective = TokenReconstruction(create("cnn-demo", weights="random"), max_mask_ratio=1.0, noise_std=0,
                                    mask_patch=16).train()
    with torch.no_grad():
        objective.mask_token.copy_(torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1))
    seen = []
    objective.backbone.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # its stem
    images = _cnn_images(4)
    torch.manual_seed(1)
    mask = objective(images)["mask"].bool().view(4, 4, 4)  # 64 px in 16 px patches
    pixels = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand_as(images)
    fill = objective.mask_token.expand_as(images)
    assert mask[:-1].any() and not mask[-1].any()  # the last image stays clean
    assert torch.equal(seen[0][pixels], fill[pixels]) and torch.equal(seen[0][~pixels], images[~pixels])


def test_batchnorm_statistics_stay_frozen_unless_asked():
    images = _cnn_images()
    for freeze in (True, False):
        objective = TokenReconstruction(create("cnn-demo", weights="random"), freeze_norm_stats=freeze).train()
        norm = objective.backbone.bn1
        before = norm.running_mean.clone()
        objective(images)["loss"].backward()
        assert torch.equal(norm.running_mean, before) == freeze and norm.weight.grad is not None
        assert not objective.teacher.training


@pytest.mark.parametrize("student, teacher", [("tiny-vit", "cnn-demo"), ("cnn-demo", "tiny-vit"),
                                              ("tiny-vit", "tiny-vit-reg")])
def test_distillation_across_architectures_resamples_the_teachers_grid_and_learns(student, teacher):
    torch.manual_seed(0)
    objective = TokenReconstruction(create(student, weights="random"),
                                    teacher=create(teacher, weights="random", **({} if teacher == "cnn-demo"
                                                                                  else {"img_size": 64}))).train()
    assert objective.layout == "grid" and not objective.residual  # widths differ: a plain MLP projector
    before, after = train(objective, _cnn_images())
    assert after < 0.5 * before, (before, after)
    assert all(not buffer.requires_grad for buffer in objective.teacher.buffers())


def test_a_teacher_of_the_same_width_but_other_weights_gets_a_plain_projector():
    torch.manual_seed(0)
    student, teacher = create("cnn-demo", weights="random"), create("cnn-demo", weights="random")
    assert not TokenReconstruction(student, teacher=teacher).residual  # mapped to another network's features
    assert TokenReconstruction(student, teacher=copy.deepcopy(student)).residual  # the student starts as it


def test_a_teacher_with_other_statistics_gets_the_images_renormalised():
    teacher = create("cnn-demo", weights="random")
    seen = []
    objective = TokenReconstruction(create("tiny-vit", weights="random"), teacher=teacher,
                                    teacher_normalisation=((IMAGENET_MEAN, IMAGENET_STD), ((0.5,) * 3, (0.5,) * 3)))
    objective.teacher.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # its stem
    images = _cnn_images(2)
    objective(images)
    pixels = images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], (pixels - 0.5) / 0.5)
