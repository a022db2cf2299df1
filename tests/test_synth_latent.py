"""LoRA fine-tuning of a local latent text-to-image model: only a small adapter is trained and shared, the base
model is read from disk and left alone, and its samples feed audit, assembly and pretraining like a pixel
generator's. The base model is a tiny random Stable-Diffusion-style folder built here: no real weights are
available offline, so these tests show the plumbing, not image quality."""

import json
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from retfm.cli.main import app
from retfm.data.config import IngestConfig
from retfm.data.ingest import ingest
from retfm.data.manifest import Manifest
from retfm.data.phantoms import generate_cohort
from retfm.errors import RetfmError
from retfm.hashing import file_sha256
from retfm.pretrain.config import PretrainConfig
from retfm.pretrain.trainer import pretrain
from retfm.synth.assemble import SUBMISSION_FILES, assemble, export
from retfm.synth.audit import audit
from retfm.synth.config import SynthAssembleConfig, SynthAuditConfig, SynthSampleConfig, SynthTrainConfig
from retfm.synth.generator import Conditions
from retfm.synth.latent import class_prompts
from retfm.synth.sample import sample
from retfm.synth.train import log_losses, train

ADAPTER = "lora/pytorch_lora_weights.safetensors"
BASE_UNET = "unet/diffusion_pytorch_model.safetensors"
STEPS = 6


def tiny_base(folder, seed: int = 0):
    """A random Stable-Diffusion-style diffusers folder: 2-level UNet with cross-attention, 2-level VAE (16 px
    images -> 8 x 8 x 4 latents), 2-layer CLIP text encoder and a byte-level CLIP tokenizer in Stable Diffusion's
    file layout (vocab.json, merges.txt: every byte a token, no merges)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*alphabet, *(c + "</w>" for c in alphabet),
                                         "<|startoftext|>", "<|endoftext|>"])}
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=77,
                                 bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                 pad_token_id=vocab["<|endoftext|>"])).save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                         layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=8, norm_num_groups=8).save_pretrained(folder / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  sample_size=16).save_pretrained(folder / "vae")
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                  steps_offset=1, set_alpha_to_one=False).save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Nothing here may reach the network (the base model is never fetched; conftest sets HF_HUB_OFFLINE too)."""
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        yield


def _config(root, **changes) -> SynthTrainConfig:
    base = dict(data=str(root / "real"), label="dr_grade", base_model=str(root / "tiny-sd"), size=16, steps=STEPS,
                batch_size=4, lr=1e-2, warmup_steps=1, lora_rank=4, workers=0, log_every=1, checkpoint_every=3)
    return SynthTrainConfig(**{**base, **changes})


def _sampling(root, **changes) -> SynthSampleConfig:
    return SynthSampleConfig(**{**dict(n=4, inference_steps=3, guidance=2.0, batch_size=4,
                                       base_model=str(root / "tiny-sd")), **changes})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """16 phantom photographs (2 sites) ingested at 32 px, a tiny base model, and a LoRA generator of it."""
    root = tmp_path_factory.mktemp("latent")
    generate_cohort(root / "raw", sites=2, per_site=8, size=64, seed=0)
    ingest(root / "raw", root / "real", IngestConfig(size=32, workers=1))
    tiny_base(root / "tiny-sd")
    root.joinpath("base_unet_sha256").write_text(file_sha256(root / "tiny-sd" / BASE_UNET))
    train(_config(root), root / "generator")
    return root


def test_only_a_small_lora_adapter_is_trained_and_shared(cohort):
    generator = cohort / "generator"
    assert not (generator / "unet").exists() and not (generator / "scheduler").exists()
    adapter = load_file(generator / ADAPTER)
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter} >= {"to_q", "to_k", "to_v"}
    assert any(k.split(".lora_")[0].endswith("to_out.0") for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at zero: it learnt
    with safe_open(generator / ADAPTER, "pt") as handle:  # peft's config travels in the file
        assert json.loads(handle.metadata()["lora_adapter_metadata"])["r"] == 4

    card = json.loads((generator / "generator.json").read_text())
    adapter_bytes, base_bytes = (generator / ADAPTER).stat().st_size, (cohort / "tiny-sd" / BASE_UNET).stat().st_size
    assert card["type"] == "latent-lora" and card["adapter_bytes"] == adapter_bytes
    assert adapter_bytes < base_bytes / 10, (adapter_bytes, base_bytes)
    assert card["base_model"]["name"] == "tiny-sd"
    assert card["base_model"]["unet_sha256"] == (cohort / "base_unet_sha256").read_text()
    assert file_sha256(cohort / "tiny-sd" / BASE_UNET) == card["base_model"]["unet_sha256"]  # base untouched
    assert card["lora"]["parameters"] == sum(v.numel() for v in adapter.values())
    assert card["prompt_source"] == "knowledge"
    grades = card["conditions"]["dr_grade"]
    assert [p["condition"] for p in card["prompts"]] == [{"dr_grade": g} for g in grades]
    assert "no diabetic retinopathy" in card["prompts"][0]["prompt"] and grades[0] == 0
    assert card["images_seen"] == STEPS * 4 and card["compute"]["training_flops_estimate"] > 0

    for shared in (generator / "generator.json", generator / ADAPTER):  # no local path leaves with the adapter
        assert str(cohort) not in shared.read_bytes().decode("latin-1")
    losses = log_losses(generator)
    assert len(losses) == STEPS and all(np.isfinite(losses))


def test_lora_training_resumes_to_the_same_adapter(cohort, tmp_path):
    config = _config(cohort, steps=4, checkpoint_every=2)
    train(config, tmp_path / "whole")
    done = []

    def crash_in_step_3(_):
        done.append(1)
        if len(done) == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "cut", progress=crash_in_step_3)
    assert (tmp_path / "cut" / "checkpoint.pt").stat().st_size < (cohort / "tiny-sd" / BASE_UNET).stat().st_size
    train(config, tmp_path / "cut", resume=True)
    whole, resumed = load_file(tmp_path / "whole" / ADAPTER), load_file(tmp_path / "cut" / ADAPTER)
    assert whole.keys() == resumed.keys() and all(whole[k].equal(resumed[k]) for k in whole)
    assert log_losses(tmp_path / "whole") == log_losses(tmp_path / "cut")


def test_lora_samples_feed_audit_assembly_and_pretraining(cohort, tmp_path):
    generator = cohort / "generator"
    card = json.loads((generator / "generator.json").read_text())
    summary = sample(generator, tmp_path / "syn", _sampling(cohort, labels="dr_grade=0:0.5,2:0.5"))
    assert summary["generated_now"] == 4
    manifest = Manifest.read(tmp_path / "syn")
    manifest.validate(check_files=True)
    table = manifest.table
    assert len(table) == 4 and table["synthetic"].all() and set(table["split"]) == {"train"}
    assert set(table["site"]) == {"synthetic"} and sorted(table["dr_grade"].tolist()) == [0, 0, 2, 2]
    assert set(table["generator_id"]) == {card["generator_id"]}
    assert set(table["generator_sha256"]) == {card["weights_sha256"]}
    images = [np.asarray(Image.open(tmp_path / "syn" / p)) for p in table["path"]]
    assert all(image.shape == (16, 16, 3) for image in images)
    assert str(cohort) not in (tmp_path / "syn" / "sample.json").read_text()  # the base's path is not recorded

    unguided = sample(generator, tmp_path / "unguided", _sampling(cohort, labels="dr_grade=0:0.5,2:0.5",
                                                                  guidance=0.0))
    assert unguided["images"] == 4
    other = [np.asarray(Image.open(tmp_path / "unguided" / p)) for p in table["path"]]
    assert any(not np.array_equal(a, b) for a, b in zip(images, other))  # the prompt steers the denoiser

    result = audit(generator, cohort / "real", tmp_path / "syn", tmp_path / "audit",
                   SynthAuditConfig(model="pixels", pixel_size=8))
    assert result["n_synthetic"] == 4
    assert (tmp_path / "audit" / "report.html").is_file()

    export(generator, tmp_path / "submission")
    files = sorted(str(p.relative_to(tmp_path / "submission")) for p in (tmp_path / "submission").rglob("*")
                   if p.is_file())
    assert files == sorted(SUBMISSION_FILES["latent-lora"]) == sorted([ADAPTER, "generator.json"])
    assembled = assemble([tmp_path / "submission"], tmp_path / "central",
                         SynthAssembleConfig(n=2, inference_steps=2, base_model=str(cohort / "tiny-sd")))
    assert assembled["images"] == 2
    provenance = json.loads((tmp_path / "central" / "provenance.json").read_text())
    assert provenance["generators"][0]["base_model"]["unet_sha256"] == card["base_model"]["unet_sha256"]
    assert str(cohort) not in json.dumps(provenance)

    result = CliRunner().invoke(app, ["synth", "sample", "--generator", str(generator), "--n", "2",
                                      "--inference-steps", "2", "--base-model", str(cohort / "tiny-sd"),
                                      "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert len(Manifest.read(tmp_path / "cli").table) == 2

    done = pretrain(PretrainConfig(objective="mae", data=[str(tmp_path / "syn")], model="tiny-vit", steps=1,
                                   batch_size=2, workers=0, warmup_steps=1,
                                   objective_options={"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}),
                    tmp_path / "pre")
    assert done["steps"] == 1 and done["data"][0]["images"] == 4


def test_sampling_needs_the_same_base_model(cohort, tmp_path):
    generator = cohort / "generator"
    with pytest.raises(RetfmError, match="--base-model") as refused:
        sample(generator, tmp_path / "a", _sampling(cohort, base_model=None))
    assert "tiny-sd" in str(refused.value) and "\n" not in str(refused.value)
    other = tiny_base(tmp_path / "other-sd", seed=1)
    with pytest.raises(RetfmError, match="not those of tiny-sd") as refused:
        sample(generator, tmp_path / "b", _sampling(cohort, base_model=str(other)))
    assert "\n" not in str(refused.value)


def test_a_missing_or_incomplete_base_model_is_one_clear_line(cohort, tmp_path):
    with pytest.raises(RetfmError, match="no such local folder") as refused:
        train(_config(cohort, base_model=str(tmp_path / "nowhere")), tmp_path / "a")
    assert str(tmp_path / "nowhere") in str(refused.value) and "\n" not in str(refused.value)

    partial = tmp_path / "partial-sd"
    shutil.copytree(cohort / "tiny-sd", partial)
    shutil.rmtree(partial / "vae")
    (partial / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(RetfmError, match="incomplete") as refused:
        train(_config(cohort, base_model=str(partial)), tmp_path / "b")
    message = str(refused.value)
    assert str(partial) in message and "\n" not in message
    assert "vae/config.json" in message and "text_encoder/model.safetensors" in message and "unet" not in message

    (partial / "vae").mkdir()
    (partial / "vae" / "config.json").write_text("{not json")
    (partial / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    shutil.copy(cohort / "tiny-sd" / "text_encoder" / "model.safetensors", partial / "text_encoder")
    with pytest.raises(RetfmError, match="cannot load vae/") as refused:
        train(_config(cohort, base_model=str(partial)), tmp_path / "c")
    assert "\n" not in str(refused.value)

    with pytest.raises(RetfmError, match="lora_targets"):
        train(_config(cohort, lora_targets=["no_such_module"]), tmp_path / "d")
    with pytest.raises(RetfmError, match="multiple of 4"):
        train(_config(cohort, size=18), tmp_path / "e")

    result = CliRunner().invoke(app, ["synth", "train", "--data", str(cohort / "real"), "--label", "dr_grade",
                                      "--base-model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "cli")])
    assert isinstance(result.exception, RetfmError) and "\n" not in str(result.exception)


def test_prompts_come_from_the_knowledge_base_or_plainly_from_the_label():
    prompts, source = class_prompts(Conditions({"dr_grade": [0, 4], "site": ["a", "b"]}), "dr_grade")
    assert source == "knowledge" and len(prompts) == 4
    assert prompts[0].startswith("site a: a color fundus photograph showing no diabetic retinopathy")
    assert prompts[3].startswith("site b: ") and "proliferative diabetic retinopathy" in prompts[3]
    prompts, source = class_prompts(Conditions({"referable": [0, 1]}), "referable")
    assert source == "plain" and prompts == ["a fundus photograph, referable 0", "a fundus photograph, referable 1"]
