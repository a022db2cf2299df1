"""Synthetic images: a conditional diffusion generator that learns, resumes exactly and samples reproducibly into
a manifest pretraining reads; audits that compute the stated measures and catch copies."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from retfm.cli.main import app
from retfm.data.config import IngestConfig
from retfm.data.ingest import ingest
from retfm.data.manifest import Manifest
from retfm.data.phantoms import generate_cohort
from retfm.errors import RetfmError
from retfm.pretrain.config import PretrainConfig
from retfm.pretrain.trainer import pretrain
from retfm.synth.assemble import SUBMISSION_FILES, assemble, export
from retfm.synth.audit import audit, frechet_distance, label_fidelity, precision_recall
from retfm.synth.config import SynthAssembleConfig, SynthAuditConfig, SynthSampleConfig, SynthTrainConfig
from retfm.synth.generator import WEIGHTS_FILENAME
from retfm.synth.sample import assign_conditions, parse_shares, sample
from retfm.synth.train import load_generator, log_losses, train

STEPS = 40


def _config(data, **changes) -> SynthTrainConfig:
    base = dict(data=str(data), label="dr_grade", cond=["site"], size=16, block_out_channels=(16, 32),
                steps=STEPS, batch_size=8, lr=2e-3, warmup_steps=5, workers=0, log_every=5, checkpoint_every=20)
    return SynthTrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """24 phantom photographs (2 sites), ingested at 32 px; a generator trained on them for 40 steps."""
    root = tmp_path_factory.mktemp("synth")
    generate_cohort(root / "raw", sites=2, per_site=12, size=64, seed=0)
    ingest(root / "raw", root / "real", IngestConfig(size=32, workers=1))
    train(_config(root / "real"), root / "generator")
    return root


def _sampling(**changes) -> SynthSampleConfig:
    return SynthSampleConfig(**{**dict(n=4, inference_steps=4, guidance=2.0, batch_size=4), **changes})


def test_training_lowers_the_loss_and_writes_a_card(cohort):
    losses = log_losses(cohort / "generator")
    assert len(losses) == STEPS // 5
    assert np.mean(losses[-2:]) < 0.6 * losses[0], losses  # from ~1 (noise variance) towards the data's
    card = json.loads((cohort / "generator" / "generator.json").read_text())
    train_rows = Manifest.read(cohort / "real").split("train").table
    assert card["conditions"]["site"] == ["site1", "site2"]
    assert card["conditions"]["dr_grade"] == sorted(train_rows["dr_grade"].unique().tolist())
    assert card["null_class"] == len(card["conditions"]["dr_grade"]) * 2
    assert card["images_seen"] == STEPS * 8 and card["data"]["images"] == len(train_rows)
    assert sum(card["class_shares"]["site"].values()) == pytest.approx(1, abs=1e-5)
    assert card["generator_id"].endswith(card["weights_sha256"][:12])


def test_resumed_training_ends_with_the_same_weights(cohort, tmp_path):
    config = _config(cohort / "real", steps=6, checkpoint_every=3, log_every=1)
    train(config, tmp_path / "whole")

    steps_done = []

    def crash_in_step_4(_):
        steps_done.append(1)
        if len(steps_done) == 4:
            raise KeyboardInterrupt  # as if killed: the last checkpoint is step 3's
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "cut", progress=crash_in_step_4)
    with pytest.raises(RetfmError, match="--resume"):
        train(config, tmp_path / "cut")
    train(config, tmp_path / "cut", resume=True)
    whole = load_file(tmp_path / "whole" / "unet" / WEIGHTS_FILENAME)
    resumed = load_file(tmp_path / "cut" / "unet" / WEIGHTS_FILENAME)
    assert all(whole[k].equal(resumed[k]) for k in whole)  # bit for bit (EMA weights)
    assert log_losses(tmp_path / "whole") == log_losses(tmp_path / "cut")


def test_the_prediction_and_noise_schedule_travel_with_the_generator(cohort, tmp_path):
    default, _ = load_generator(cohort / "generator", None)
    assert (default.scheduler.config.prediction_type, default.scheduler.config.beta_schedule) == \
        ("v_prediction", "squaredcos_cap_v2")
    train(_config(cohort / "real", steps=2, prediction="epsilon", noise_schedule="linear"), tmp_path / "eps")
    chosen, _ = load_generator(tmp_path / "eps", None)
    assert (chosen.scheduler.config.prediction_type, chosen.scheduler.config.beta_schedule) == ("epsilon", "linear")
    assert sample(tmp_path / "eps", tmp_path / "drawn", _sampling(n=2))["generated_now"] == 2


def test_sampling_is_reproducible_resumable_and_guided(cohort, tmp_path):
    generator = cohort / "generator"
    first = sample(generator, tmp_path / "a", _sampling())
    assert first["generated_now"] == 4
    again = sample(generator, tmp_path / "b", _sampling(batch_size=3))  # other batches, same images
    pixels = {run: np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / run / "images").glob("*.png"))])
              for run in ("a", "b")}
    assert np.abs(pixels["a"].astype(int) - pixels["b"].astype(int)).max() <= 1
    assert again["generated_now"] == 4

    removed = sorted((tmp_path / "a" / "images").glob("*.png"))[1:3]
    for path in removed:
        path.unlink()
    resumed = sample(generator, tmp_path / "a", _sampling())
    assert (resumed["generated_now"], resumed["kept"]) == (2, 2)
    assert np.array_equal(np.stack([np.asarray(Image.open(p)) for p in
                                    sorted((tmp_path / "a" / "images").glob("*.png"))]), pixels["a"])
    with pytest.raises(RetfmError, match="another generator or other options"):
        sample(generator, tmp_path / "a", _sampling(guidance=1.0))

    sample(generator, tmp_path / "unguided", _sampling(guidance=0.0))
    unguided = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "unguided" / "images").glob("*.png"))])
    assert np.abs(unguided.astype(float) - pixels["a"]).mean() > 2  # the condition steers the denoiser


def test_synthetic_manifest_feeds_pretraining(cohort, tmp_path):
    sample(cohort / "generator", tmp_path / "syn", _sampling(n=6, labels="dr_grade=0:0.5,1:0.5;site=site2:1"))
    table = Manifest.read(tmp_path / "syn").table
    assert set(table["split"]) == {"train"} and table["synthetic"].all() and set(table["site"]) == {"site2"}
    assert sorted(table["dr_grade"].tolist()) == [0, 0, 0, 1, 1, 1]
    card = json.loads((cohort / "generator" / "generator.json").read_text())
    assert set(table["generator_sha256"]) == {card["weights_sha256"]}
    assert Manifest.read(tmp_path / "syn").label_columns == ["dr_grade"]  # generator columns are not labels
    result = pretrain(PretrainConfig(objective="mae", data=[str(tmp_path / "syn")], model="tiny-vit", steps=2,
                                     batch_size=2, workers=0, warmup_steps=1,
                                     objective_options={"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}),
                      tmp_path / "pre")
    assert result["steps"] == 2 and result["data"][0]["images"] == 6


def test_condition_shares_are_parsed_checked_and_met_exactly():
    card = {"conditions": {"dr_grade": [0, 1, 2], "site": ["a", "b"]},
            "class_shares": {"dr_grade": {"0": 0.5, "1": 0.3, "2": 0.2}, "site": {"a": 0.75, "b": 0.25}}}
    shares = parse_shares("dr_grade=0:1,2:3", card)
    assert shares == {"dr_grade": {0: 0.25, 2: 0.75}, "site": {"a": 0.75, "b": 0.25}}
    rows = assign_conditions(10, shares, seed=0)
    assert rows["dr_grade"].value_counts().to_dict() == {2: 7, 0: 3}  # 7.5 and 2.5: the tie goes to the first value
    assert rows["site"].value_counts().to_dict() == {"a": 8, "b": 2}
    assert rows.equals(assign_conditions(10, shares, seed=0)) and not rows.equals(assign_conditions(10, shares, 1))
    with pytest.raises(RetfmError, match="not one of the generator's values"):
        parse_shares("dr_grade=7:1", card)
    with pytest.raises(RetfmError, match="conditioned on dr_grade, site"):
        parse_shares("amd=1:1", card)


def test_frechet_distance_and_precision_recall_match_their_definitions():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    # Gaussians N(0, I) and N(m, 4I) in 3-D: |m|^2 + 3 * (1 + 4 - 2 * 2) = |m|^2 + 3
    b = rng.normal(size=(4000, 3)) * 2 + np.array([1.0, 2.0, 0.0])
    assert frechet_distance(rng.normal(size=(4000, 3)), b) == pytest.approx(5 + 3, rel=0.08)
    real = rng.normal(size=(300, 2))
    inside = precision_recall(real, real[:150] + 1e-9, k=3)
    assert inside["precision"] == 1.0 and 0.5 <= inside["recall"] < 1.0  # half the real set, so less recall
    far = precision_recall(real, real + 100, k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_label_fidelity_counts_agreement_with_the_condition_and_its_wilson_interval():
    rng = np.random.default_rng(0)
    # real images: the label is the sign of the first feature; 40 to fit on, 20 held out (val)
    y_real = np.array([0, 1] * 30)
    real = np.c_[np.where(y_real == 1, 3.0, -3.0) + rng.normal(0, 0.5, 60), rng.normal(0, 1, 60)]
    table = pd.DataFrame({"referable": y_real, "split": ["train"] * 40 + ["val"] * 20})
    # 20 synthetic images conditioned on 1: 17 show the sign, 3 do not
    fake = np.c_[[3.0] * 17 + [-3.0] * 3, np.zeros(20)]
    result = label_fidelity(real, table, (table["split"] == "train").to_numpy(), fake, [1] * 20, "referable",
                            [0, 1], seed=0)
    assert result["accuracy"] == 17 / 20 and result["real_heldout_accuracy"] == 1.0
    assert result["confusion"] == [[0, 0], [3, 17]] and result["kappa"] == pytest.approx(0)  # one class asked for
    z, n, p = 1.959963985, 20, 17 / 20
    shrink = 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / shrink, z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / shrink
    assert result["accuracy_ci95"] == pytest.approx([centre - half, centre + half], abs=1e-6)


def test_audit_flags_copies_of_training_images_and_not_the_generator(cohort, tmp_path):
    generator, real = cohort / "generator", Manifest.read(cohort / "real")
    card = json.loads((generator / "generator.json").read_text())
    sample(generator, tmp_path / "syn", _sampling(n=8))
    config = SynthAuditConfig(model="pixels", pixel_size=8)
    normal = audit(generator, cohort / "real", tmp_path / "syn", tmp_path / "audit", config)
    assert not normal["memorisation"]["flagged"] and normal["memorisation"]["near_copies"] == 0

    # A "generator" that hands back its training images, as a memorising one would.
    copies = _as_synthetic(real, real.split("train").table.head(8), card, tmp_path / "copies")
    copied = audit(generator, cohort / "real", copies, tmp_path / "copy_audit", config)
    memorised = copied["memorisation"]
    assert memorised["flagged"] and memorised["near_copies"] == 8 and memorised["synthetic_to_real_min"] < 1e-6
    assert copied["fidelity"]["precision"] == 1.0
    assert copied["label_fidelity"]["n_classifier_train"] + copied["label_fidelity"]["n_classifier_heldout"] > 0
    html = (tmp_path / "copy_audit" / "report.html").read_text()
    assert "FLAGGED" in html and html.count("data:image/png;base64,") >= 8 * 2 + 1 and "http" not in html
    assert "P0001" not in html  # original file names never reach the report
    saved = json.loads((tmp_path / "copy_audit" / "audit.json").read_text())
    assert saved["memorisation"]["near_copies"] == 8

    with pytest.raises(RetfmError, match="not from"):
        audit(generator, cohort / "real", cohort / "real", tmp_path / "x", config)


def _as_synthetic(real: Manifest, rows: pd.DataFrame, card: dict, folder, side: int | None = None):
    """``rows``' real images posing as ``card``'s generator's samples; ``side``: drawn at that size."""
    (folder / "images").mkdir(parents=True)
    for path in rows["path"]:
        image = Image.open(real.root / path)
        if side:
            image = image.resize((side, side), Image.BILINEAR)
        image.save(folder / "images" / path.split("/")[-1])
    Manifest(pd.DataFrame({"image_id": [f"copy{i}" for i in range(len(rows))],
                           "path": ["images/" + p.split("/")[-1] for p in rows["path"]],
                           "site": "synthetic", "split": "train", "synthetic": True,
                           "dr_grade": rows["dr_grade"].to_numpy(), "generator_id": card["generator_id"],
                           "generator_sha256": card["weights_sha256"]}), folder).write()
    return folder


def test_real_and_synthetic_images_are_compared_at_the_generators_size(cohort, tmp_path):
    """Training images at the generator's 16 px are copies, although the real ones are stored at 32 px; and a
    generator of one label value gets a note instead of a label-fidelity score."""
    generator, real = cohort / "generator", Manifest.read(cohort / "real")
    card = json.loads((generator / "generator.json").read_text())
    small = _as_synthetic(real, real.split("train").table.head(6), card, tmp_path / "small", side=16)
    result = audit(generator, cohort / "real", small, tmp_path / "audit", SynthAuditConfig(model="pixels",
                                                                                           pixel_size=16))
    assert result["encoder"]["images_at"] == 16 and result["memorisation"]["near_copies"] == 6

    single = tmp_path / "single"
    shutil.copytree(generator, single)
    (single / "generator.json").write_text(json.dumps({**card, "conditions": {**card["conditions"],
                                                                             "dr_grade": [0]}}))
    fidelity = audit(single, cohort / "real", small, tmp_path / "audit1", SynthAuditConfig(model="pixels"))
    assert fidelity["label_fidelity"] == {"note": "the generator knows one dr_grade value only: no label to tell apart"}


def test_a_sites_generator_learns_from_and_is_audited_against_that_site_only(cohort, tmp_path):
    real = Manifest.read(cohort / "real").split("train").table
    site1 = int((real["site"] == "site1").sum())
    assert 0 < site1 < len(real)
    card = train(_config(cohort / "real", cond=[], sites=["site1"], steps=2), tmp_path / "generator")
    assert card["data"]["sites"] == ["site1"] and card["data"]["images"] == site1
    sample(tmp_path / "generator", tmp_path / "syn", _sampling(n=4))
    result = audit(tmp_path / "generator", cohort / "real", tmp_path / "syn", tmp_path / "audit",
                   SynthAuditConfig(model="pixels", pixel_size=8))
    assert result["n_real"] == site1
    with pytest.raises(RetfmError, match="of site.s. nowhere"):
        train(_config(cohort / "real", sites=["nowhere"]), tmp_path / "none")


def test_cli_runs_sample_and_reports_errors_in_one_line(cohort, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["synth", "--help"])
    assert result.exit_code == 0 and all(c in result.output for c in ("train", "sample", "audit"))
    result = runner.invoke(app, ["synth", "train", "--data", str(cohort / "real"), "--label", "amd", "--cond", "site",
                                 "--size", "16", "--steps", "2", "--batch-size", "4", "--workers", "0",
                                 "--set", "block_out_channels=16,32", "--out", str(tmp_path / "gen")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "gen" / "generator.json").read_text())["cond"] == ["site"]
    result = runner.invoke(app, ["synth", "sample", "--generator", str(tmp_path / "gen"), "--n", "2",
                                 "--sampler", "dpm", "--inference-steps", "3", "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert len(Manifest.read(tmp_path / "cli").table) == 2
    result = runner.invoke(app, ["synth", "audit", "--generator", str(tmp_path / "gen"), "--real",
                                 str(cohort / "real"), "--synthetic", str(tmp_path / "cli"), "--model", "tiny-vit",
                                 "--weights", "random", "--out", str(tmp_path / "audit")])
    assert result.exit_code == 0, result.output
    assert "memorisation:" in result.output and (tmp_path / "audit" / "report.html").is_file()
    with pytest.raises(RetfmError, match="not in the manifest"):
        train(_config(cohort / "real", label="no_such_label"), tmp_path / "bad")


@pytest.fixture(scope="module")
def submissions(cohort):
    """What two sites send: each one's own generator (trained 2 steps on its rows only), exported."""
    folders = []
    for site in ("site1", "site2"):
        train(_config(cohort / "real", cond=[], sites=[site], steps=2), cohort / f"trained_{site}")
        export(cohort / f"trained_{site}", cohort / f"submission_{site}")
        folders.append(cohort / f"submission_{site}")
    return folders


def _assembling(**changes) -> SynthAssembleConfig:
    return SynthAssembleConfig(**{**dict(n=10, inference_steps=2, guidance=2.0, batch_size=10), **changes})


def test_a_submission_holds_the_generator_and_card_only(cohort, submissions):
    files = sorted(str(p.relative_to(submissions[0])) for p in submissions[0].rglob("*") if p.is_file())
    assert files == sorted(SUBMISSION_FILES["pixel"])  # no checkpoint (optimiser state), log or config file
    assert (cohort / "trained_site1" / "checkpoint.pt").is_file()
    for name in files:  # no local path: the card keeps the data's hash, not where it lives
        assert str(cohort) not in (submissions[0] / name).read_text(errors="ignore")
    with pytest.raises(RetfmError, match="not empty"):
        export(cohort / "trained_site1", submissions[0])


def test_assembly_samples_each_site_in_its_own_label_mix_with_provenance(cohort, submissions, tmp_path):
    out = tmp_path / "central"
    summary = assemble(submissions, out, _assembling())
    assert (summary["images"], summary["generated_now"]) == (20, 20)
    manifest = Manifest.read(out)
    manifest.validate(check_files=True)  # paths are relative to the central folder
    table = manifest.table
    assert set(table["split"]) == {"train"} and table["synthetic"].all()
    assert manifest.label_columns == ["dr_grade"]  # provenance columns are not labels
    assert set(table["path"].str.split("/").str[0]) == {"site1", "site2"}
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["images"] == 20 and provenance["retfm_version"]
    for entry, folder in zip(provenance["generators"], submissions):
        card = json.loads((folder / "generator.json").read_text())
        rows = table[table["source_site"] == card["data"]["sites"][0]]
        assert len(rows) == entry["n"] == 10 and set(rows["generator_id"]) == {card["generator_id"]}
        assert set(rows["generator_sha256"]) == {card["weights_sha256"]} == {entry["weights_sha256"]}
        shares = card["class_shares"]["dr_grade"]
        counts = rows["dr_grade"].astype(str).value_counts().to_dict()
        assert set(counts) <= set(shares)
        assert all(abs(counts.get(v, 0) - s * 10) < 1 for v, s in shares.items())  # the site's mix, within rounding
        assert entry["class_shares"] == card["class_shares"] and entry["sites"] == card["data"]["sites"]
        assert (entry["steps"], entry["images_seen"]) == (card["steps"], card["images_seen"])
    assert provenance["generators"][0]["seed"] != provenance["generators"][1]["seed"]  # no shared starting noise

    again = assemble(submissions, out, _assembling())  # resumes: nothing to draw again
    assert (again["generated_now"], again["kept"]) == (0, 20)
    assert Manifest.read(out).table.equals(table)
    with pytest.raises(RetfmError, match="other generators or options"):
        assemble(submissions, out, _assembling(guidance=1.0))

    split = assemble(submissions, tmp_path / "by_images", _assembling(n=7, allocation="by_images"))
    images = [json.loads((f / "generator.json").read_text())["data"]["images"] for f in submissions]
    counts = Manifest.read(tmp_path / "by_images").table["source_site"].value_counts()
    assert split["images"] == 7 and all(abs(counts[f"site{i + 1}"] - 7 * m / sum(images)) < 1
                                        for i, m in enumerate(images))

    result = pretrain(PretrainConfig(objective="mae", data=[str(out)], model="tiny-vit", steps=2, batch_size=2,
                                     workers=0, warmup_steps=1,
                                     objective_options={"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}),
                      tmp_path / "pre")
    assert result["steps"] == 2 and result["data"][0]["images"] == 20


def test_assembly_refuses_altered_weights_and_repeated_generators(submissions, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(submissions[1], tampered)
    weights = tampered / "unet" / WEIGHTS_FILENAME
    weights.write_bytes(weights.read_bytes()[:-8])  # a partial upload
    for generators in ([submissions[0], tampered], [tampered]):
        with pytest.raises(RetfmError, match="differ from its card") as refused:
            assemble(generators, tmp_path / "out", _assembling())
        assert str(tampered) in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()  # refused before any sampling

    copy = tmp_path / "copy"
    shutil.copytree(submissions[0], copy)
    for generators in ([submissions[0], submissions[0]], [submissions[0], copy]):
        with pytest.raises(RetfmError, match="the same generator as"):
            assemble(generators, tmp_path / "out", _assembling())
    with pytest.raises(RetfmError, match="gets no image"):
        assemble(submissions, tmp_path / "out", _assembling(n=1, allocation="by_images"))


def test_cli_exports_and_assembles_and_reports_errors_in_one_line(cohort, submissions, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["synth", "export", "--generator", str(cohort / "trained_site2"),
                                 "--out", str(tmp_path / "sub")])
    assert result.exit_code == 0 and "send this folder" in " ".join(result.output.split()), result.output
    result = runner.invoke(app, ["synth", "assemble", "--generator", str(submissions[0]), "--generator",
                                 str(tmp_path / "sub"), "--n", "2", "--inference-steps", "2",
                                 "--out", str(tmp_path / "central")])
    assert result.exit_code == 0, result.output
    assert "4 synthetic images from 2 generators" in " ".join(result.output.split())
    assert len(Manifest.read(tmp_path / "central").table) == 4
    (tmp_path / "sub" / "unet" / WEIGHTS_FILENAME).write_bytes(b"not the weights")
    result = runner.invoke(app, ["synth", "assemble", "--generator", str(submissions[0]), "--generator",
                                 str(tmp_path / "sub"), "--n", "2", "--out", str(tmp_path / "again")])
    assert isinstance(result.exception, RetfmError) and "\n" not in str(result.exception)
    assert str(tmp_path / "sub") in str(result.exception)
