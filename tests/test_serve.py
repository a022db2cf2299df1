"""retfm serve: the API screens a photograph as the model would, refuses what it must (no key, too big, no image,
bombs), says when an image is ungradable, triages batches and zips, batches concurrent requests, and keeps file
names out of logs and answers."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import struct
import tempfile
import zipfile
import zlib

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from retfm.adapt.config import EmbedConfig, FinetuneConfig
from retfm.adapt.embed import embed
from retfm.adapt.finetune import finetune
from retfm.data import fundus
from retfm.data.datasets import eval_transform
from retfm.data.manifest import Manifest
from retfm.models import create, preprocessing, spec
from retfm.retrieval.config import IndexConfig
from retfm.retrieval.index import build_index
from retfm.serve.app import create_app
from retfm.serve.batching import MicroBatcher
from retfm.serve.config import ServeConfig
from retfm.serve.screening import Screener

from tests.conftest import encode, fundus_rgb, shared_file

KEY = "test-key-0123456789abcdef"
AUTH = {"X-API-Key": KEY}


def make_served_model(root, model_name="tiny-vit"):
    """A tiny fine-tuned classifier (brighter fundus = class 1) over a cohort stored as ingest stores images
    (field-of-view crops), and a retrieval index over the cohort embedded by that checkpoint's backbone."""
    (root / "cohort" / "images").mkdir(parents=True)
    rows = []
    for i in range(32):
        label = i % 2
        rgb = np.clip(fundus_rgb(128, seed=i).astype(np.float32) * (1.3 if label else 0.7), 0, 255).astype(np.uint8)
        crop, _ = fundus.preprocess(rgb, 512)
        Image.fromarray(crop).save(root / "cohort" / "images" / f"im{i:02d}.png")
        patient = i // 2
        rows.append({"image_id": f"im{i:02d}", "path": f"images/im{i:02d}.png", "site": f"site{1 + i // 16}",
                     "split": "test" if patient % 4 == 0 else "val" if patient % 4 == 1 else "train",
                     "patient_id": f"p{patient}", "finding": label})
    Manifest(pd.DataFrame(rows), root / "cohort").write(root / "cohort")
    finetune(FinetuneConfig(data=str(root / "cohort"), model=model_name, weights="random", label="finding",
                            epochs=1, warmup_epochs=0, batch_size=8, workers=0, bootstrap=20, randaugment=None,
                            random_erasing=0.0, select_metric="loss", by=["site"]), root / "run")
    model = root / "run" / "model.safetensors"
    embed(root / "cohort", root / "emb.parquet", EmbedConfig(model=str(model), workers=0))
    build_index(root / "emb.parquet", root / "index", IndexConfig(kind="exact"))
    return model, root / "index"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model, index = make_served_model(tmp_path_factory.mktemp("serve"))
    config = ServeConfig(model=model, index=index, api_key=KEY)
    return config, Screener(config)


@pytest.fixture(scope="module")
def client(served):
    config, screener = served
    with TestClient(create_app(config, screener)) as test_client:
        yield test_client


def photo() -> bytes:
    return shared_file("retina_cc0.jpg").read_bytes()


def blurred_photo() -> bytes:
    """The sample out of focus: well exposed, but no vessel edges left to grade."""
    return encode(cv2.GaussianBlur(np.asarray(Image.open(io.BytesIO(photo())).convert("RGB")), (0, 0), 12))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (CRC fixed): what a decompression bomb looks like on open."""
    data = bytearray(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[12:ihdr + 13])))
    return bytes(data)


# ---- one photograph ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["cnn-demo", "efficientnet-lite0"])
def test_a_convolutional_classifier_is_explained_on_its_last_stage(tmp_path, model_name):
    model, index = make_served_model(tmp_path, model_name)
    screener = Screener(ServeConfig(model=model, index=index, api_key=KEY, engine="torch"))  # heatmaps: PyTorch
    [result] = screener.run_batch([(screener.prepare(photo()), True)])
    assert result["heatmap"]["method"] == "Grad-CAM, last convolutional stage"
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(result["heatmap"]["png_base64"]))))
    assert overlay.shape[:2] == (448, 448)
    assert len(result["similar_cases"]) == 5


def test_the_inference_engine_gives_pytorchs_answers(served, client):
    """Predictions without heatmaps run on the engine chosen at start (auto: here measured on phantoms); they
    are PyTorch eager's answers: probabilities within bf16's rounding, so the same decisions except within that of
    the threshold, and the same similar cases."""
    config, screener = served
    reference = Screener(config.model_copy(update={"engine": "torch"}))
    uploads = [screener.prepare(photo())] + [screener.prepare(encode(fundus_rgb(400, seed=s))) for s in range(5)]
    uploads = [p for p in uploads if p.gradable]
    fast = screener.run_batch([(p, False) for p in uploads])
    exact = reference.run_batch([(p, False) for p in uploads])
    tolerance = 1e-5 if screener.features.precision == "fp32" else 2e-3
    for a, b in zip(fast, exact):
        assert [p["class"] for p in a["probabilities"]] == [p["class"] for p in b["probabilities"]]
        got, expected = ([p["probability"] for p in answer["probabilities"]] for answer in (a, b))
        assert np.allclose(got, expected, atol=tolerance), (got, expected)
        # The same decision, unless PyTorch's own probability lies within the tolerance of the threshold.
        if abs(expected[1] - screener.threshold) > tolerance:
            assert a["prediction"] == b["prediction"] and a["positive"] == b["positive"]
        assert {c["image_id"] for c in a["similar_cases"]} == {c["image_id"] for c in b["similar_cases"]}
    assert screener.features.fidelity["faithful"] and screener.embedder.fidelity["faithful"]
    assert client.get("/healthz").json()["engine"] == screener.features.label


def test_predict_gives_the_models_probabilities_at_the_cards_threshold_with_heatmap_and_cases(client, served):
    config, screener = served
    answer = client.post("/v1/predict", files={"file": ("x.jpg", photo(), "image/jpeg")}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["verdict"] == "gradable" and result["reasons"] == []
    assert result["quality"]["quality"] > 0.9

    # The same numbers as the checkpoint gives on the same field-of-view crop, decoded the same way (within bf16's
    # rounding where the engine chosen at start runs bf16).
    from retfm.data.io import decode_image
    crop, _ = fundus.preprocess(decode_image(photo(), min_side=512).rgb, 512)
    model = create(config.model, num_classes=2)
    with torch.inference_mode():
        expected = torch.softmax(model(eval_transform(preprocessing(spec(config.model)))(Image.fromarray(crop))[None]),
                                 dim=1)[0].numpy()
    got = np.array([entry["probability"] for entry in result["probabilities"]])
    assert [entry["class"] for entry in result["probabilities"]] == ["0", "1"]
    assert np.allclose(got, expected, atol=1e-5 if screener.features.precision == "fp32" else 2e-3), (got, expected)
    assert result["threshold"] == pytest.approx(screener.card["threshold"])
    assert result["positive"] == (got[1] >= result["threshold"])
    assert result["prediction"] == ("1" if result["positive"] else "0")
    assert result["risk"] == pytest.approx(got[1], abs=1e-5)

    overlay = Image.open(io.BytesIO(base64.b64decode(result["heatmap"]["png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (448, 448)
    assert result["heatmap"]["class"] == "1"

    cases = result["similar_cases"]
    assert len(cases) == 5 and all(set(case) == {"image_id", "label", "site", "similarity"} for case in cases)
    assert [c["similarity"] for c in cases] == sorted((c["similarity"] for c in cases), reverse=True)


def test_an_indexed_image_finds_itself_first(client, served, tmp_path):
    config, _ = served
    stored = config.model.parent.parent / "cohort" / "images" / "im07.png"
    result = client.post("/v1/predict?heatmap=false", content=stored.read_bytes(),
                         headers={**AUTH, "content-type": "image/png"}).json()
    assert "heatmap" not in result
    first = result["similar_cases"][0]
    assert first["image_id"] == "im07" and first["similarity"] > 0.98
    assert first["label"] == 1 and first["site"] == "site1"


def test_ungradable_images_get_that_verdict_and_no_findings(client):
    blurred = blurred_photo()
    for image, reason in ((blurred, "sharpness"), (encode(np.full((300, 300, 3), 128, np.uint8), "PNG"),
                                                    "no fundus")):
        result = client.post("/v1/predict", content=image, headers=AUTH).json()
        assert result["verdict"] == "ungradable"
        assert reason in result["reasons"][0]
        assert not {"probabilities", "prediction", "risk", "heatmap", "similar_cases"} & set(result)
    blurred_quality = client.post("/v1/predict", content=blurred, headers=AUTH).json()["quality"]
    assert blurred_quality["quality"] < 0.4 and blurred_quality["quality_sharpness"] < 0.1
    assert blurred_quality["quality_exposure"] > 0.9


# ---- refusals ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["/v1/predict", "/v1/batch", "/v1/model"])
def test_v1_needs_the_api_key(client, route):
    call = client.get if route == "/v1/model" else client.post
    for headers in ({}, {"X-API-Key": "wrong-key-0123456789"}, {"X-API-Key": KEY[:-1]}):
        answer = call(route, headers=headers)
        assert answer.status_code == 401 and "API key" in answer.json()["detail"]
    assert call(route, headers=AUTH).status_code != 401


def test_health_needs_no_key_and_docs_stay_offline(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "tiny-vit-finding" and health["index"] is True
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/batch", "/v1/model", "/healthz"} <= set(schema["paths"])
    assert "APIKeyHeader" in schema["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN
    page = client.get("/")
    assert page.status_code == 200 and 'id="drop-zone"' in page.text
    for asset in ("/static/app.js", "/static/style.css", "/"):
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text, asset


def test_non_images_are_415_with_a_clear_message(client):
    declared_jpeg = {**AUTH, "content-type": "image/jpeg"}
    for answer in (client.post("/v1/predict", content=b"PatientName,Doe\n", headers=declared_jpeg),
                   client.post("/v1/predict", files={"file": ("scan.jpg", b"%PDF-1.7 not really", "image/jpeg")},
                               headers=AUTH)):
        assert answer.status_code == 415
        assert answer.json()["detail"] == ("not usable as a fundus photograph: not an image "
                                           "(not a recognised image format)")
    assert client.post("/v1/predict", content=b"", headers=AUTH).status_code == 400  # no file at all


def test_oversize_uploads_and_bombs_are_refused(served):
    config, screener = served
    small = config.model_copy(update={"max_upload_mb": 0.1, "max_pixels": 1_000_000})
    with TestClient(create_app(small, screener)) as limited:
        big = photo()  # 263 KiB > 100 KiB
        answer = limited.post("/v1/predict", content=big, headers=AUTH)
        assert answer.status_code == 413 and "exceeds the limit of 104857 bytes" in answer.json()["detail"]

        def chunks():  # no Content-Length: the limit holds while reading
            for start in range(0, len(big), 16384):
                yield big[start:start + 16384]
        assert limited.post("/v1/predict", content=chunks(), headers=AUTH).status_code == 413

        # a real decompression bomb for this limit: 8 MB of pixels in 8 KB of PNG
        bomb = encode(np.zeros((1600, 1600, 3), np.uint8), "PNG")
        assert len(bomb) < 20_000
        answer = limited.post("/v1/predict", content=bomb, headers=AUTH)
        assert answer.status_code == 413 and "too many pixels" in answer.json()["detail"]
    answer = TestClient(create_app(config, screener)).post("/v1/predict", content=png_claiming(50_000, 50_000),
                                                           headers=AUTH)
    assert answer.status_code == 413 and "too many pixels" in answer.json()["detail"]


# ---- batches ----------------------------------------------------------------------------------------------------

def test_batch_of_files_and_a_zip_is_a_triage_list_by_risk(client, served):
    config, _ = served
    images = config.model.parent.parent / "cohort" / "images"
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("Doe_Jane/", "")  # a folder entry: skipped
        zipped.writestr("Doe_Jane/a.png", (images / "im03.png").read_bytes())
        zipped.writestr("Doe_Jane/notes.txt", b"not an image")
        zipped.writestr("Doe_Jane/b.png", (images / "im04.png").read_bytes())
    blurred = blurred_photo()
    files = [("files", ("first.jpg", photo(), "image/jpeg")), ("files", ("visit.zip", archive.getvalue(),
                                                                          "application/zip")),
             ("files", ("blurred.jpg", blurred, "image/jpeg"))]
    answer = client.post("/v1/batch", files=files, headers=AUTH)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["counts"] == {"gradable": 3, "ungradable": 1, "rejected": 1}
    rows = result["items"]
    assert sorted(r["item"] for r in rows) == [0, 1, 2, 3, 4]
    by_item = {r["item"]: r for r in rows}
    assert [by_item[i]["zip_entry"] for i in range(5)] == [None, 0, 1, 2, None]
    assert by_item[2]["verdict"] == "rejected" and "not an image" in by_item[2]["reasons"][0]
    assert by_item[4]["verdict"] == "ungradable"
    gradable = [r for r in rows if r["verdict"] == "gradable"]
    assert [r["verdict"] for r in rows] == ["gradable"] * 3 + ["ungradable", "rejected"]
    assert [r["risk"] for r in gradable] == sorted((r["risk"] for r in gradable), reverse=True)
    single = client.post("/v1/predict", content=(images / "im04.png").read_bytes(), headers=AUTH).json()
    _, screener = served  # batched = alone (with its heatmap), within the engine's rounding
    assert by_item[3]["risk"] == pytest.approx(single["risk"], abs=1e-5 if screener.features.precision == "fp32"
                                               else 2e-3)
    assert "Doe_Jane" not in answer.text and "first.jpg" not in answer.text


def test_zip_bombs_and_too_many_images_are_refused(served):
    config, screener = served
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("zeros.png", bytes(30 * 1024 * 1024))
    assert len(bomb.getvalue()) < 100_000
    limited = config.model_copy(update={"max_upload_mb": 1.0, "max_batch_images": 2})
    with TestClient(create_app(limited, screener)) as client:
        answer = client.post("/v1/batch", files=[("files", ("z.zip", bomb.getvalue(), "application/zip"))],
                             headers=AUTH)
        assert answer.status_code == 413 and "unpack to more than" in answer.json()["detail"]
        three = [("files", (f"{i}.png", encode(fundus_rgb(64, seed=i), "PNG"), "image/png")) for i in range(3)]
        answer = client.post("/v1/batch", files=three, headers=AUTH)
        assert answer.status_code == 413 and "more than 2 images" in answer.json()["detail"]


# ---- the model card, logs, storage ------------------------------------------------------------------------------

def test_model_card_has_data_metrics_with_cis_groups_licence_use_and_limits(client, served):
    card = client.get("/v1/model", headers=AUTH).json()
    assert card["classes"] == ["0", "1"] and card["label"] == "finding" and card["task"] == "binary"
    assert card["licence"] and card["intended_use"] and card["limits"]
    assert card["training"]["train_images"] == 16 and card["training"]["validation_images"] == 8
    auroc = card["evaluation"]["metrics"]["auroc"]
    assert auroc["ci"] is not None and auroc["ci"][0] <= auroc["value"] <= auroc["ci"][1]
    assert set(card["evaluation"]["groups"]["site"]) == {"site1", "site2"}
    assert card["evaluation"]["test_images"] == 8
    assert card["index"] == {"images": 32, "model": "tiny-vit-finding", "label": "finding"}


def test_logs_and_answers_carry_no_file_names_and_nothing_touches_disk(client, caplog, monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("an upload went to a temporary file")
    for name in ("TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    noise = encode(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8), "PNG")
    assert len(noise) > 1024 * 1024  # more than Starlette would keep in memory
    name = "Doe_Jane_1961-02-03_MRN12345.png"
    with caplog.at_level(logging.DEBUG):
        first = client.post("/v1/predict", files={"file": (name, noise, "image/png")}, headers=AUTH)
        second = client.post("/v1/batch", files=[("files", (name, photo(), "image/jpeg"))], headers=AUTH)
    assert first.status_code == 200 and first.json()["verdict"] == "ungradable"
    assert second.status_code == 200
    assert "predict: ungradable" in caplog.text and "batch: 1 images" in caplog.text
    for text in (caplog.text, first.text, second.text):
        assert "Doe" not in text and "MRN12345" not in text and "1961" not in text


def test_keep_uploads_writes_under_random_names(served, tmp_path):
    config, screener = served
    keeping = config.model_copy(update={"keep_uploads": tmp_path / "kept"})
    with TestClient(create_app(keeping, screener)) as client:
        client.post("/v1/predict", files={"file": ("Doe_Jane.jpg", photo(), "image/jpeg")}, headers=AUTH)
    kept = list((tmp_path / "kept").iterdir())
    assert len(kept) == 1 and kept[0].read_bytes() == photo() and "Doe" not in kept[0].name


# ---- micro-batching ---------------------------------------------------------------------------------------------

def test_concurrent_requests_share_forward_passes(served):
    config, screener = served
    with TestClient(create_app(config.model_copy(update={"batch_wait_ms": 200}), screener)) as client:
        from concurrent.futures import ThreadPoolExecutor

        image = (config.model.parent.parent / "cohort" / "images" / "im05.png").read_bytes()
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: client.post("/v1/predict?heatmap=false", content=image,
                                                          headers=AUTH), range(6)))
        assert all(a.status_code == 200 for a in answers)
        assert len({a.json()["risk"] for a in answers}) == 1
        health = client.get("/healthz").json()
        assert health["images_in_passes"] == 6 and health["forward_passes"] < 6


def test_micro_batcher_fills_batches_keeps_order_and_survives_a_failure():
    sizes = []

    def run(items):
        sizes.append(len(items))
        if "boom" in items:
            raise ValueError("boom")
        return [item * 10 for item in items]

    async def scenario():
        batcher = MicroBatcher(run, max_batch=4, max_wait_ms=100)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        failed = await asyncio.gather(batcher.submit("boom"), return_exceptions=True)
        after = await batcher.submit(7)
        await batcher.stop()
        return results, failed, after

    results, failed, after = asyncio.run(scenario())
    assert results == [i * 10 for i in range(10)]
    assert sizes[:3] == [4, 4, 2]
    assert isinstance(failed[0], ValueError) and after == 70


# ---- the command --------------------------------------------------------------------------------------------------

def test_serve_command_refuses_a_model_that_is_not_a_classifier_and_a_short_key(tmp_path):
    from typer.testing import CliRunner

    from retfm.cli.main import app
    from retfm.errors import RetfmError
    from retfm.models import save_checkpoint

    save_checkpoint(create("tiny-vit", weights="random"), spec("tiny-vit"), tmp_path / "encoder.safetensors")
    (tmp_path / "key").write_text(KEY)
    (tmp_path / "short").write_text("1234")
    run = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "encoder.safetensors"), "--api-key-file",
                                   str(tmp_path / "key")])
    assert isinstance(run.exception, RetfmError) and "not a classifier card" in str(run.exception)
    run = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "encoder.safetensors"), "--api-key-file",
                                   str(tmp_path / "short")])
    assert isinstance(run.exception, RetfmError) and "at least 16 characters" in str(run.exception)
