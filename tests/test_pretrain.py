"""The pretraining trainer: exact resume after SIGKILL, mixed data, schedule, and a backbone usable by name."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from retfm.adapt.config import EmbedConfig

from retfm.data.config import IngestConfig

from retfm.data.ingest import ingest
from retfm.data.phantoms import generate_cohort
from retfm.data.shards import ShardDataset, write_shards
from retfm.errors import RetfmError
from retfm.pretrain.config import PretrainConfig
from retfm.pretrain.trainer import MixedData, warmup_cosine, pretrain

TINY_MAE = ["--set", "objective_options={decoder_dim: 32, decoder_depth: 1, decoder_heads: 2}"]
TINY_CLIP = "{embed_dim: 16, text: {width: 32, heads: 2, layers: 1, context_length: 32}}"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    generate_cohort(root / "raw", sites=2, per_site=12, size=96, seed=0)
    ingest(root / "raw", root / "ds", IngestConfig(size=64, workers=1))
    return root / "ds"


RUNS = {"mae": ["--objective", "mae", "--model", "tiny-vit", *TINY_MAE],
        "token-reconstruction": ["--objective", "token-reconstruction", "--model", "cnn-demo"]}


def _command(data, out, steps, *extra, objective="mae"):
    return [sys.executable, "-m", "retfm.cli.main", "pretrain", *RUNS[objective], "--data", str(data),
            "--out", str(out), "--steps", str(steps), "--batch-size", "4", "--workers", "1",
            "--set", "checkpoint_every=3", "--set", "log_every=1", "--set", "warmup_steps=5", *extra]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("objective, width", [("mae", 64), ("token-reconstruction", 512)])
def test_killed_run_resumes_to_the_same_weights_bit_for_bit(cohort, tmp_path, objective, width):
    """MAE on a ViT, and token reconstruction on a CNN student (masked image patches, channels_last)."""
    steps = 24
    whole = subprocess.run(_command(cohort, tmp_path / "whole", steps, objective=objective), env=_env(),
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]

    kill_after = random.Random(os.getpid()).randint(4, steps - 4)  # a different step on every run
    run = subprocess.Popen(_command(cohort, tmp_path / "cut", steps, objective=objective), env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "cut" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and run.poll() is None:
        if log.exists() and any(json.loads(line)["step"] >= kill_after for line in log.read_text().splitlines()):
            run.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert run.wait(30) == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["state"]["step"]
    assert 0 < saved < steps and not (tmp_path / "cut" / "model.safetensors").exists()

    resumed = subprocess.run(_command(cohort, tmp_path / "cut", steps, "--resume", objective=objective), env=_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    first, second = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    logged = [json.loads(line)["step"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # steps redone after the checkpoint are logged once
    whole_losses = [json.loads(line)["loss"] for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    cut_losses = [json.loads(line)["loss"] for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert whole_losses == cut_losses

    # The backbone works wherever a model name does.
    from retfm.adapt.embed import embed

    card = json.loads((tmp_path / "cut" / "model.json").read_text())
    assert card["objective"] == objective and card["images_seen"] == steps * 4 and card["steps"] == steps
    assert card["compute"]["training_flops_estimate"] > 0 and card["data"][0]["images"] > 0
    summary = embed(cohort, tmp_path / "emb.parquet", EmbedConfig(model=str(tmp_path / "cut" / "model.safetensors"),
                                                                  workers=0))
    assert summary["images"] == 24 and summary["embed_dim"] == width


def test_a_new_run_refuses_an_existing_folder_and_resume_needs_a_checkpoint(cohort, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    run = subprocess.run(_command(cohort, tmp_path / "run", 2), env=_env(), capture_output=True, text=True)
    assert run.returncode == 2 and "--resume" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    run = subprocess.run(_command(cohort, tmp_path / "none", 2, "--resume"), env=_env(), capture_output=True,
                         text=True)
    assert run.returncode == 2 and "nothing to resume" in run.stderr


def test_mixed_data_follows_the_weights_and_is_a_function_of_seed_and_epoch(cohort, tmp_path):
    config = PretrainConfig(objective="mae", data=[str(cohort), str(cohort)], data_weights=[0.75, 0.25], model="tiny-vit",
                            split=None)
    from retfm.data.datasets import Preprocessing

    data = MixedData(config, Preprocessing(64))
    order = data.order(0)
    size = len(data.datasets[0])
    assert len(order) == 2 * size
    assert abs((order < size).mean() - 0.75) < 1 / size
    assert np.array_equal(order, MixedData(config, Preprocessing(64)).order(0))
    assert not np.array_equal(order, data.order(1))


def test_schedule_warms_up_then_follows_a_cosine_to_min_lr():
    config = PretrainConfig(objective="mae", data=["x"], model="tiny-vit", steps=110, warmup_steps=10, min_lr=1e-6)
    factor = warmup_cosine(config, 1e-3)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx((1e-6 + (1e-3 - 1e-6) * 0.5) / 1e-3)
    assert factor(110) * 1e-3 == pytest.approx(1e-6)


@pytest.mark.parametrize("objective, model", [("mae", "tiny-vit"), ("token-reconstruction", "tiny-vit"),
                                              ("clip", "tiny-vit"), ("token-reconstruction", "cnn-demo")])
def test_two_processes_match_one_with_the_same_global_batch(cohort, tmp_path, objective, model):
    """torchrun with 2 CPU processes (gloo), 4 images each, against 1 process with 8: the same samples, masks and
    noise (every process draws the global batch's random numbers and keeps its rows), so only the order of
    floating-point sums differs; weights agree within 5e-5 after 6 AdamW steps at lr 3e-4 to 6e-4 (with gradient
    accumulation for token reconstruction). Adam divides by the root of tiny second moments, so rounding in
    near-zero gradients moves a weight by up to a fraction of the learning rate: 1e-5 was measured at the edge.
    A CNN student (masked on image patches) keeps its BatchNorm statistics, so its batches need no syncing."""
    common = ["pretrain", "--objective", objective, "--data", str(cohort), "--model", model, "--steps", "6",
              "--workers", "0", "--set", "warmup_steps=2", "--set", "log_every=1", "--set", "blr=0.01"]
    # MAE with one micro-batch per step; token reconstruction with two (gradients averaged once per step); CLIP
    # contrasting the global batch (features gathered across processes).
    common += {"mae": TINY_MAE, "token-reconstruction": ["--set", "accum_steps=2"],
               "clip": ["--set", f"objective_options={TINY_CLIP}"]}[objective]
    single = subprocess.run([sys.executable, "-m", "retfm.cli.main", *common, "--batch-size", "8",
                             "--out", str(tmp_path / "one")], env=_env(), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "retfm.cli.main", *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
                            env=_env(), capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 5e-5
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert np.allclose(losses[0], losses[1], atol=1e-5) and len(losses[0]) == 6
    assert len(set(losses[0])) == 6  # training moved: every step's loss differs
    card = json.loads((tmp_path / "two" / "model.json").read_text())
    assert card["images_seen"] == 48 * (2 if objective == "token-reconstruction" else 1)
    assert card["compute"]["processes"] == 2


def test_streams_shards_and_resumes_a_crashed_run_to_the_same_weights(cohort, tmp_path):
    """Shards instead of a manifest: 3 shards, batches of 3 across epoch ends, a crash after step 5 (checkpoints
    every 2 steps) resumed from step 4 ends with the same weights and log as an uninterrupted run."""
    index = write_shards(cohort, tmp_path / "shards", shard_size=6, split="train")
    config = PretrainConfig(objective="mae", data=[str(tmp_path / "shards")], model="tiny-vit", steps=9,
                            batch_size=3, workers=0, checkpoint_every=2, warmup_steps=2, log_every=1,
                            shuffle_buffer=4, objective_options={"decoder_dim": 32, "decoder_depth": 1,
                                                                 "decoder_heads": 2})
    whole = pretrain(config, tmp_path / "whole")

    class Crash(Exception):
        pass

    done = []

    def crash_after_five(n):
        done.append(n)
        if len(done) == 5:
            raise Crash

    with pytest.raises(Crash):
        pretrain(config, tmp_path / "cut", progress=crash_after_five)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["state"]["step"] == 4
    resumed = pretrain(config, tmp_path / "cut", resume=True)
    first, second = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    logs = [(tmp_path / run / "log.jsonl").read_text() for run in ("whole", "cut")]
    assert logs[0].count("\n") == 9 and [json.loads(x)["loss"] for x in logs[0].splitlines()] == \
        [json.loads(x)["loss"] for x in logs[1].splitlines()]
    assert whole["images_seen"] == resumed["images_seen"] == 27
    assert whole["data"] == [{"shards": 3, "images": index["total"],
                              "source_manifest_sha256": index["source_manifest_sha256"]}]
    assert max(json.loads(x)["epoch"] for x in logs[0].splitlines()) >= 1  # the stream went round again
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "whole" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 10))

    with pytest.raises(RetfmError, match="split=null"):
        pretrain(config.model_copy(update={"split": "val"}), tmp_path / "wrong-split")


def test_every_rank_gets_the_same_number_of_whole_batches_from_shards(cohort, tmp_path):
    """Shards of 5, 5, 5, 1 images over 2 ranks: whichever shards a rank draws, the epoch stops at the fewest
    whole batches any rank and worker layout gives, so DDP processes never wait on one another."""
    write_shards(cohort, tmp_path / "shards", shard_size=5, split=None)  # 24 images: 5, 5, 5, 5, 4
    dataset = ShardDataset(tmp_path / "shards", seed=0)
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for workers in (0, 1, 2):
            per_rank = [sum(sum(dataset.counts[i] for i in dataset._shards_of(rank, 2)[w::max(workers, 1)]) // 2
                            for w in range(max(workers, 1))) for rank in range(2)]
            assert dataset.full_batches(2, workers, 2) == min(per_rank)
    assert dataset.full_batches(5, 2, 2) == 2  # ranks hold 3 and 2 shards; the 4-image shard gives no batch


def test_token_reconstruction_takes_a_teacher_from_the_registry_or_a_checkpoint(cohort, tmp_path):
    from retfm.models import create, save_checkpoint, spec

    torch.manual_seed(3)
    teacher = create("tiny-vit", weights="random")
    save_checkpoint(teacher, spec("tiny-vit"), tmp_path / "teacher.safetensors", name="teacher")
    config = PretrainConfig(objective="token-reconstruction", data=[str(cohort)], model="tiny-vit", steps=1,
                            batch_size=4, workers=0, teacher=str(tmp_path / "teacher.safetensors"))
    from retfm.pretrain.trainer import build_objective

    objective = build_objective(config, create("tiny-vit", weights="random"), spec("tiny-vit"))
    assert all(torch.equal(a, b) for a, b in zip(objective.teacher.state_dict().values(),
                                                  teacher.state_dict().values()))
    card = pretrain(config, tmp_path / "run")
    assert card["teacher"] == str(tmp_path / "teacher.safetensors")
    with pytest.raises(RetfmError, match="only token-reconstruction"):
        build_objective(config.model_copy(update={"objective": "mae"}), create("tiny-vit", weights="random"),
                        spec("tiny-vit"))
