"""Inference engines (retfm.models.engine): the same features as PyTorch eager, the choice recorded with the
embeddings, exports reused, and a missing or broken engine costs one warning line and nothing else."""

import json
import sys
import warnings

import numpy as np
import pytest
import torch

from retfm.adapt.config import EmbedConfig
from retfm.adapt.embed import embed
from retfm.adapt.embeddings import read_embeddings
from retfm.data.config import IngestConfig
from retfm.data.datasets import eval_transform
from retfm.data.ingest import ingest
from retfm.data.phantoms import generate_cohort
from retfm.errors import RetfmError
from retfm.models import create, preprocessing, spec
from retfm.models import engine as engine_module
from retfm.models.engine import EngineWarning, candidates, cpu_has_bf16, select

from tests.conftest import fundus_rgb

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


def images(model_name: str, count: int = 8) -> torch.Tensor:
    from PIL import Image

    transform = eval_transform(preprocessing(spec(model_name)))
    return torch.stack([transform(Image.fromarray(fundus_rgb(96, seed=i))) for i in range(count)])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    generate_cohort(root / "raw", sites=2, per_site=10, size=96, seed=0)
    ingest(root / "raw", root / "ds", IngestConfig(size=80, workers=1))
    torch.manual_seed(0)
    weights = root / "cnn.pt"
    torch.save(create("cnn-demo", weights="random").state_dict(), weights)
    return root / "ds", weights


def _config(weights, **kwargs) -> EmbedConfig:
    return EmbedConfig(**{"model": "cnn-demo", "weights": str(weights), "batch_size": 4, "workers": 0, **kwargs})


def test_fp32_engines_give_pytorchs_features():
    model_name = "vit-demo-p8"
    torch.manual_seed(0)
    model = create(model_name, weights="random")
    batch = images(model_name)
    with torch.inference_mode():
        expected = model(batch)
    for name in ("onnxruntime", "openvino"):
        engine = select(model, batch, identity=model_name, engine=name, batch_size=3)
        assert (engine.name, engine.precision) == (name, "fp32")
        assert engine.fidelity["faithful"] and engine.fidelity["cosine_min"] >= 0.9999
        assert torch.allclose(engine(batch), expected, atol=1e-4, rtol=1e-4)
    if cpu_has_bf16():  # bf16 keeps the features close, not equal
        engine = select(model, batch, identity=model_name, engine="openvino", precision="bf16")
        assert engine.fidelity["cosine_min"] > 0.99


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack via the C library: Linux")
def test_building_an_openvino_engine_leaves_the_threads_signal_stack_as_it_was():
    """OpenVINO's compile registers a signal stack of its own on the calling thread; processes that then handled
    a signal there were killed (SIGSEGV, no traceback). The thread's own must be back after every build."""
    import ctypes

    libc = ctypes.CDLL(None)

    def signal_stack() -> tuple:
        stack = engine_module._SignalStack()
        assert libc.sigaltstack(None, ctypes.byref(stack)) == 0
        return stack.sp, stack.flags, stack.size

    before = signal_stack()
    torch.manual_seed(0)
    model = create("cnn-demo", weights="random")
    for precision in ("fp32", "bf16") if cpu_has_bf16() else ("fp32",):
        select(model, images("cnn-demo"), identity="cnn-demo-signal-stack", engine="openvino", precision=precision)
        assert signal_stack() == before


def test_auto_keeps_the_fastest_faithful_engine_and_fp32_where_the_cpu_has_no_bf16(monkeypatch):
    torch.manual_seed(0)
    model = create("vit-demo-p8", weights="random")
    batch = images("vit-demo-p8")
    chosen = select(model, batch, identity="vit-demo-p8")
    tried = {t["engine"]: t for t in chosen.fidelity["tried"]}
    best = max((t for t in tried.values() if t["faithful"]), key=lambda t: t["images_per_s"])
    assert chosen.fidelity["faithful"] and chosen.label in (best["engine"], "torch fp32")
    if chosen.label == "torch fp32":  # no engine was clearly faster
        assert best["images_per_s"] < engine_module.MIN_GAIN * tried["torch fp32"]["images_per_s"]
    assert any(label.endswith("bf16") for label in tried) == cpu_has_bf16()
    # The speeds are kept: the next run tries the engines fastest first, stops at the first faithful one and
    # chooses the same.
    again = select(model, batch, identity="vit-demo-p8")
    assert again.label == chosen.label and len(again.fidelity["tried"]) <= len(tried)

    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: False)
    assert all(precision == "fp32" for _, precision in candidates())
    assert select(model, batch, identity="vit-demo-p8").precision == "fp32"


def test_impossible_pairs_are_one_clear_error(cohort, tmp_path):
    data, weights = cohort
    with pytest.raises(RetfmError, match="runs fp32, not bf16"):
        embed(data, tmp_path / "e.parquet", _config(weights, engine="onnxruntime", precision="bf16"))
    with pytest.raises(RetfmError, match="only the torch engine"):
        candidates("openvino", None, device="cuda")


def test_embed_records_the_engine_and_reuses_its_export(cohort, tmp_path, monkeypatch):
    data, weights = cohort
    embed(data, tmp_path / "torch.parquet", _config(weights, engine="torch"))
    embed(data, tmp_path / "ov.parquet", _config(weights, engine="openvino"))
    table, vectors, meta = read_embeddings(tmp_path / "ov.parquet")
    torch_table, torch_vectors, torch_meta = read_embeddings(tmp_path / "torch.parquet")
    assert list(table["image_id"]) == list(torch_table["image_id"])
    assert np.allclose(vectors, torch_vectors, atol=1e-4, rtol=1e-4)
    record = json.loads(meta["retfm.engine"])
    assert (record["engine"], record["precision"]) == ("openvino", "fp32")
    assert record["fidelity"]["images"] == 16 and record["fidelity"]["cosine_min"] >= 0.9999
    assert json.loads(torch_meta["retfm.engine"])["engine"] == "torch"
    # Auto stays on PyTorch for a job eager finishes in seconds; with the threshold lowered it measures the
    # engines and keeps a faithful one.
    embed(data, tmp_path / "auto-small.parquet", _config(weights))
    assert json.loads(read_embeddings(tmp_path / "auto-small.parquet")[2]["retfm.engine"])["engine"] == "torch"

    def no_export(*args):
        raise AssertionError("exported again")

    monkeypatch.setattr(engine_module, "_export", no_export)  # the cached export serves every later run
    monkeypatch.setattr(engine_module, "AUTO_MIN_EAGER_SECONDS", 0)
    embed(data, tmp_path / "auto.parquet", _config(weights))
    record = json.loads(read_embeddings(tmp_path / "auto.parquet")[2]["retfm.engine"])
    assert record["fidelity"]["faithful"] and len(record["fidelity"]["tried"]) >= 3


def test_a_missing_or_failing_engine_is_one_warning_and_pytorchs_result(cohort, tmp_path, monkeypatch):
    data, weights = cohort
    embed(data, tmp_path / "torch.parquet", _config(weights, engine="torch"))
    _, expected, _ = read_embeddings(tmp_path / "torch.parquet")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.warns(EngineWarning) as caught:
        embed(data, tmp_path / "ort.parquet", _config(weights, engine="onnxruntime"))
    assert len(caught) == 1 and "onnxruntime fp32 unavailable" in str(caught[0].message)
    assert "using torch fp32" in str(caught[0].message) and "\n" not in str(caught[0].message)
    _, vectors, meta = read_embeddings(tmp_path / "ort.parquet")
    assert json.loads(meta["retfm.engine"])["engine"] == "torch" and np.array_equal(vectors, expected)

    def broken_export(*args):
        raise RuntimeError("the exporter failed\nwith a long story")

    monkeypatch.setattr(engine_module, "export_onnx", broken_export)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embed(data, tmp_path / "ov.parquet", _config(weights, engine="openvino", precision="int8"))
    assert [str(w.message) for w in caught if w.category is EngineWarning] == [
        "openvino int8 unavailable (RuntimeError: the exporter failed); using torch fp32"]
    assert np.array_equal(read_embeddings(tmp_path / "ov.parquet")[1], expected)


def test_int8_is_calibrated_on_the_users_images_and_cached(tmp_path, monkeypatch):
    """Also the fallback of accuracy control: on this random ViT no set of layers restored to f32 reaches the bar,
    and NNCF's last try (cosine_min 0.964) is worse than plain quantisation, which must be kept."""
    pytest.importorskip("nncf")
    torch.manual_seed(0)
    model = create("vit-demo-p8", weights="random")
    batch, calibration = images("vit-demo-p8", 4), images("vit-demo-p8", 12)
    engine = select(model, batch, identity="vit", engine="openvino", precision="int8", quantization=calibration)
    assert engine.precision == "int8" and 0.99 < engine.fidelity["cosine_min"] <= 1
    assert "centred_cosine_min" in engine.fidelity

    import nncf

    monkeypatch.setattr(nncf, "quantize", lambda *a, **k: pytest.fail("quantised again"))
    again = select(model, batch, identity="vit", engine="openvino", precision="int8", quantization=calibration)
    assert again.fidelity["cosine_min"] == engine.fidelity["cosine_min"]


def test_int8_accuracy_control_puts_layers_back_to_f32_until_the_features_hold(monkeypatch):
    """Plain int8 moves the ImageNet EfficientNet-Lite0's features (centred cosine ~0.92 on phantoms); NNCF's accuracy
    control, steered on the quantisation images, puts the most harmful layers back to f32 and brings the features
    of *other* images closer to eager fp32."""
    pytest.importorskip("nncf")
    from retfm.models import engine as engine_module

    model = create("efficientnet-lite0")
    shown = torch.nn.functional.interpolate(images("efficientnet-lite0", 12), size=112, mode="bilinear")  # faster
    batch, calibration = shown[8:], shown[:8]
    monkeypatch.setattr(engine_module, "INT8_MAX_DROP", 0.03)  # a few layers back to f32 are enough: a short test
    restored = select(model, batch, identity="lite0", engine="openvino", precision="int8", quantization=calibration)
    monkeypatch.setattr(engine_module, "INT8_MAX_DROP", 1.0)  # any drop allowed: plain post-training quantisation
    plain = select(model, batch, identity="lite0", engine="openvino", precision="int8", quantization=calibration)
    assert plain.fidelity["centred_cosine"] < 0.98
    assert restored.fidelity["centred_cosine"] > plain.fidelity["centred_cosine"] + 0.01


def test_the_command_prints_retfms_warnings_as_one_line():
    from retfm.cli.main import _warning_line

    message = EngineWarning("onnxruntime fp32 unavailable (ImportError: no module); using torch fp32")
    assert _warning_line(message, EngineWarning, "engine.py", 1) == f"warning: {message}\n"
    assert "UserWarning" in _warning_line(UserWarning("other"), UserWarning, "x.py", 1)
