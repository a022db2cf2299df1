"""Faster CPU inference for a frozen model: the same features from ONNX Runtime or OpenVINO, checked against PyTorch.

An :class:`Engine` runs one frozen network (images B x 3 x S x S -> a float32 tensor) on the CPU:

- ``torch``: PyTorch eager, fp32 (the reference) or bf16 autocast;
- ``onnxruntime``: the network exported once to ONNX (``torch.onnx.export``), run by ONNX Runtime, fp32;
- ``openvino``: the same ONNX file read by OpenVINO and compiled for this CPU with ``INFERENCE_PRECISION_HINT``
  f32 or bf16 (OpenVINO's default on a CPU with bf16 instructions is bf16, so fp32 is asked for explicitly), or
  quantised to int8 by NNCF's post-training quantisation on the caller's calibration images, with accuracy
  control: quantised layers go back to f32, the most harmful first, until the int8 features' centred cosine
  against eager fp32 on those images is within :data:`INT8_MAX_DROP` of 1.

:func:`select` builds the engines asked for and measures each on a calibration batch of the caller's own
images: features against PyTorch eager fp32 (cosine, and cosine after subtracting the mean feature, which shows
losses that the shared mean hides) and images per second. ``engine="auto"`` keeps the fastest whose features
match within :data:`MIN_COSINE` (every calibration image) and :data:`MIN_CENTRED_COSINE` (the batch, centred), if
it beats eager by :data:`MIN_GAIN`; bf16 is tried only where the CPU has bf16 instructions, int8 only when asked
for. An engine that is not installed or fails to export is skipped, with one warning line; PyTorch is always
there to fall back on.

Exports are cached in :func:`cache_dir`, one folder per network (the caller's identity: weights hash and
preprocessing), input size, exporter version and, for int8, OpenVINO/NNCF versions and the calibration images.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from retfm.errors import RetfmError, RetfmWarning

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
PRECISIONS_OF = {"torch": ("fp32", "bf16"), "onnxruntime": ("fp32",), "openvino": ("fp32", "bf16", "int8")}
MIN_COSINE = 0.9999  # auto's tolerance against PyTorch eager fp32, on every calibration image
MIN_CENTRED_COSINE = 0.999  # and over the calibration batch after subtracting its mean reference feature
MIN_GAIN = 1.1  # auto replaces PyTorch eager only by an engine measured at least this much faster
CALIBRATION_IMAGES = 16
# Under auto (fp32 or no precision asked), a job PyTorch eager finishes in less than this stays on it: exporting
# the model and measuring the engines would cost more than they can save.
AUTO_MIN_EAGER_SECONDS = 60.0
QUANTIZATION_IMAGES = 128
# int8: NNCF puts quantised layers back to floating point, the most harmful first, until the centred cosine of the
# int8 features against PyTorch eager fp32 on the quantisation images is within this of 1.
INT8_MAX_DROP = 0.004
INT8_RANKING_IMAGES = 32  # the quantisation images on which each layer's harm is ranked
ONNX_OPSET = 18
CACHE_ENV = "RETFM_CACHE"


class EngineWarning(RetfmWarning):
    """An engine asked for (or tried by auto) could not be built; another one runs instead."""


@dataclass
class Engine:
    """A frozen network's forward pass on one engine: ``engine(batch)`` -> features (float32)."""

    name: str
    precision: str
    run: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    version: str = ""
    fidelity: dict | None = None
    images_per_s: float | None = None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.run(batch)

    @property
    def label(self) -> str:
        return f"{self.name} {self.precision}"

    def describe(self) -> dict:
        return {"engine": self.name, "precision": self.precision, "version": self.version,
                "fidelity": self.fidelity}

    def summary(self) -> str:
        """One line for people: the engine and how closely its features match PyTorch eager fp32."""
        measured = self.fidelity or {}
        if "note" in measured or "cosine_min" not in measured:
            return f"engine: {self.label} ({measured.get('note', 'the reference')})"
        return (f"engine: {self.label}, feature cosine to PyTorch eager fp32 >= {measured['cosine_min']:.6f} "
                f"(centred, over the batch: {measured['centred_cosine']:.6f}) on {measured['images']} of your images")


class PreLogits(nn.Module):
    """A timm classifier's pooled features before its last linear layer (``model.get_classifier()``): what an
    engine runs for a classifier, so that its fidelity is judged on features."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def cache_dir() -> Path:
    """Where exports are kept: ``$RETFM_CACHE/engines``, else ``$XDG_CACHE_HOME/retfm/engines``, else
    ``~/.cache/retfm/engines``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "engines"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retfm" / "engines"


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX-BF16), as OpenVINO's CPU plugin reports it."""
    try:
        import openvino
    except ImportError:
        return False
    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check(engine: str = "auto", precision: str | None = None, device: str = "cpu") -> None:
    """One clear error for an engine, precision and device that do not go together (no engine library loaded)."""
    if engine not in ENGINES:
        raise RetfmError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    if precision is not None and precision not in PRECISIONS:
        raise RetfmError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if device != "cpu" and (engine not in ("auto", "torch") or precision == "int8"):
        raise RetfmError(f"--device {device}: only the torch engine at fp32 or bf16 runs there "
                         "(ONNX Runtime, OpenVINO and int8 are CPU engines here)")
    if engine != "auto" and (precision or "fp32") not in PRECISIONS_OF[engine]:
        raise RetfmError(f"engine {engine} runs {', '.join(PRECISIONS_OF[engine])}, not {precision}")


def candidates(engine: str = "auto", precision: str | None = None, device: str = "cpu") -> list[tuple[str, str]]:
    """The (engine, precision) pairs to try, fastest first as measured on a 2-core CPU; one clear error for a pair
    that does not exist. ``precision=None``: fp32, and bf16 too under ``auto`` where the CPU has it."""
    check(engine, precision, device)
    if device != "cpu":
        return [("torch", precision or "fp32")]
    if engine != "auto":
        return [(engine, precision or "fp32")]
    if precision == "int8":
        return [("openvino", "int8")]
    bf16 = [("openvino", "bf16"), ("torch", "bf16")]
    fp32 = [("openvino", "fp32"), ("onnxruntime", "fp32"), ("torch", "fp32")]
    if precision == "bf16":
        return bf16
    return (bf16 if precision is None and cpu_has_bf16() else []) + fp32


def select(model: nn.Module, calibration: torch.Tensor, identity: str, engine: str = "auto",
           precision: str | None = None, batch_size: int = 4, quantization: torch.Tensor | None = None,
           device: str = "cpu", workload: int | None = None) -> Engine:
    """The engine to run ``model`` with, measured on ``calibration`` (images the model will see, preprocessed).

    ``identity`` names the network (weights hash, preprocessing) for the export cache; ``quantization``: the
    images int8 is calibrated on (default: ``calibration``). Under ``auto`` (with fp32 or no precision asked)
    the fastest engine whose features match eager fp32 within the tolerance is kept, if it beats PyTorch eager
    by :data:`MIN_GAIN`; an engine named explicitly is kept whatever its fidelity, which is measured and recorded
    all the same. An engine that cannot be built gives one :class:`EngineWarning` and PyTorch runs instead.
    ``workload``: the images the engine is for; under auto, fewer than PyTorch eager runs in
    :data:`AUTO_MIN_EAGER_SECONDS` stay on it.

    Auto times every engine the first time it meets a network (speeds kept in the cache beside the exports);
    later runs try the engines fastest first and stop at the first faithful one."""
    model = model.eval()
    check(engine, precision, device)
    eager = torch_engine(model, "fp32")
    if (engine == "torch" or device != "cpu") and precision in (None, "fp32"):
        eager.fidelity = {"exact": True, "note": "PyTorch eager fp32 is the reference"}
        return eager
    reference, eager.images_per_s = _measure(eager, calibration, batch_size)
    eager.fidelity = fidelity(reference, reference)
    gated = engine == "auto" and precision in (None, "fp32")
    if gated and workload is not None and workload / eager.images_per_s < AUTO_MIN_EAGER_SECONDS:
        eager.fidelity["note"] = (f"auto: PyTorch eager runs these {workload} images in about "
                                  f"{workload / eager.images_per_s:.0f} s; no export below "
                                  f"{AUTO_MIN_EAGER_SECONDS:.0f} s")
        return eager
    wanted = candidates(engine, precision, device)  # only now are the engine libraries loaded
    speeds_file = cache_dir() / "speeds" / (_key(identity, tuple(calibration.shape[1:]), batch_size, wanted,
                                                 torch.get_num_threads()) + ".json")
    known = json.loads(speeds_file.read_text()) if speeds_file.is_file() else {}
    if known:
        wanted = sorted(wanted, key=lambda pair: -known.get(" ".join(pair), 0.0))
    built, failed = [], []
    for name, wanted_precision in wanted:
        candidate = eager if (name, wanted_precision) == ("torch", "fp32") else _built(
            model, name, wanted_precision, identity, calibration, quantization, batch_size, reference, failed)
        if candidate is not None:
            built.append(candidate)
            if known and gated and candidate.fidelity["faithful"]:
                break  # the fastest faithful engine, by the speeds measured the first time
    if len(wanted) > 1 and not known and not failed:
        speeds_file.parent.mkdir(parents=True, exist_ok=True)
        speeds_file.write_text(json.dumps({e.label: e.images_per_s for e in built}))
    speed = {**{e.label: e.images_per_s for e in built}, **known}
    usable = [e for e in built if not gated or e.fidelity["faithful"]]
    if not usable:  # an explicit engine that failed: PyTorch at the asked precision where it has it
        fallback_precision = wanted[0][1] if wanted[0][1] in PRECISIONS_OF["torch"] else "fp32"
        usable = [eager if fallback_precision == "fp32" else _built(model, "torch", fallback_precision, identity,
                                                                     calibration, None, batch_size, reference, [])]
    chosen = max(usable, key=lambda e: speed.get(e.label, 0.0))
    if gated and chosen is not eager and speed[chosen.label] < MIN_GAIN * speed[eager.label]:
        chosen = eager  # no clear gain: the reference itself
    if failed:
        warnings.warn(f"{'; '.join(failed)}; using {chosen.label}", EngineWarning, stacklevel=2)
    chosen.fidelity = {**chosen.fidelity, "tried": [
        {"engine": e.label, "images_per_s": speed.get(e.label), "faithful": e.fidelity["faithful"],
         "cosine_min": e.fidelity["cosine_min"], "centred_cosine": e.fidelity["centred_cosine"]} for e in built] +
        [{"engine": f, "error": True} for f in failed]}
    return chosen


def _built(model, name, precision, identity, calibration, quantization, batch_size, reference,
           failed: list[str]) -> Engine | None:
    """One engine, measured against the reference features; None (and a line in ``failed``) when it cannot be
    built or run."""
    try:
        candidate = build(model, name, precision, identity, calibration[:2],
                          quantization if quantization is not None else calibration)
        features, candidate.images_per_s = _measure(candidate, calibration, batch_size)
    except Exception as exc:  # a missing library or a failed export: skip it, never crash  # noqa: BLE001
        failed.append(f"{name} {precision} unavailable ({_reason(exc)})")
        return None
    candidate.fidelity = fidelity(features, reference)
    return candidate


def fidelity(features: torch.Tensor, reference: torch.Tensor) -> dict:
    """Cosine of each image's features with the reference's (``cosine_min``, ``cosine_mean``), and after
    subtracting the reference's mean feature: over the whole batch at once (``centred_cosine``: one minus the
    relative error of what tells images apart) and per image (``centred_cosine_min``, noisy for images near the
    mean). ``faithful``: ``cosine_min`` >= :data:`MIN_COSINE` and ``centred_cosine`` >= :data:`MIN_CENTRED_COSINE`."""
    features, reference = features.double(), reference.double()
    raw = torch.nn.functional.cosine_similarity(features, reference, dim=1)
    batch, per_image = centred_cosines(features, reference)
    values = {"cosine_min": raw.min(), "cosine_mean": raw.mean(), "centred_cosine": batch,
              "centred_cosine_min": per_image.min(), "centred_cosine_mean": per_image.mean()}
    values = {k: round(float(v), 6) for k, v in values.items()}
    return {"images": len(reference), **values,
            "faithful": values["cosine_min"] >= MIN_COSINE and values["centred_cosine"] >= MIN_CENTRED_COSINE,
            "tolerance": {"cosine_min": MIN_COSINE, "centred_cosine": MIN_CENTRED_COSINE}}


def centred_cosines(features: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """After subtracting the reference's mean feature: the cosine over the whole batch, and each image's."""
    features, reference = features.double(), reference.double()
    centred_features, centred_reference = features - reference.mean(0), reference - reference.mean(0)
    batch = torch.nn.functional.cosine_similarity(centred_features.flatten(), centred_reference.flatten(), dim=0)
    return batch, torch.nn.functional.cosine_similarity(centred_features, centred_reference, dim=1)


# ---- building one engine -------------------------------------------------------------------------------------------

def build(model: nn.Module, name: str, precision: str, identity: str, example: torch.Tensor,
          quantization: torch.Tensor | None = None) -> Engine:
    """One engine for ``model``; raises whatever the engine's library raises when it cannot be built."""
    if name == "torch":
        return torch_engine(model, precision)
    onnx_file = export_onnx(model, identity, example)
    threads = torch.get_num_threads()
    if name == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # errors only
        session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        return Engine(name, precision,
                      lambda batch: torch.from_numpy(session.run(None, {input_name: _array(batch)})[0]),
                      version=onnxruntime.__version__)
    if name == "openvino":
        import openvino

        core = openvino.Core()
        # int8: the layers left unquantised run in f32, as NNCF's accuracy control measured them
        hint = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        with _keep_signal_stack():  # NNCF compiles networks too
            network = core.read_model(onnx_file) if precision != "int8" else _quantized(
                core, onnx_file, identity, model, quantization)
            compiled = core.compile_model(network, "CPU", {**hint, "INFERENCE_NUM_THREADS": threads,
                                                           "PERFORMANCE_HINT": "LATENCY"})
        return Engine(name, precision, lambda batch: torch.from_numpy(compiled(_array(batch))[0]),
                      version=openvino.__version__)
    raise RetfmError(f"engine {name!r} is not one of {', '.join(ENGINES[1:])}")


def torch_engine(model: nn.Module, precision: str = "fp32") -> Engine:
    """PyTorch eager under inference mode, on the model's device; bf16 by autocast."""
    device = next(model.parameters()).device

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            return model(batch.to(device, non_blocking=True)).float()

    return Engine("torch", precision, run, version=torch.__version__)


def export_onnx(model: nn.Module, identity: str, example: torch.Tensor) -> Path:
    """The model as ONNX with a dynamic batch, exported once per identity, input shape and torch version."""
    key = _key(identity, tuple(example.shape[1:]), "onnx", torch.__version__, ONNX_OPSET)
    return _cached(key, "model.onnx", lambda path: _export(model, example, path))


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = example.expand(2, *example.shape[1:]).contiguous() if len(example) < 2 else example
    with _quiet():
        torch.onnx.export(model, (example,), path, input_names=["images"], output_names=["features"],
                          opset_version=ONNX_OPSET, dynamo=True, dynamic_shapes=({0: batch},), verbose=False)


def _quantized(core, onnx_file: Path, identity: str, model: nn.Module, images: torch.Tensor):
    """The network quantised to int8 by NNCF on ``images`` (cached by their hash and the library versions). Where the
    int8 features' centred cosine against eager fp32 on those images falls short of ``1 - INT8_MAX_DROP``, NNCF's
    accuracy control puts layers back to f32, the most harmful first, until it holds; its result is kept only if it
    is closer to fp32 than plain quantisation."""
    import openvino

    with _quiet():  # importing NNCF logs that torch found no CUDA
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    digest = hashlib.sha256(_array(images).tobytes()).hexdigest()
    key = _key(identity, tuple(images.shape[1:]), "openvino-int8", openvino.__version__, nncf.__version__, digest,
               "accuracy control", INT8_MAX_DROP, INT8_RANKING_IMAGES)

    def quantize(path: Path) -> None:
        transformer = any("Attention" in type(m).__name__ for m in model.modules())
        batches = [_array(images[i:i + 1]) for i in range(len(images))]
        device = next(model.parameters()).device
        with torch.inference_mode():
            target = torch.cat([model(batch.to(device)).float().cpu() for batch in images.split(16)])

        def centred_cosine(compiled, items) -> tuple[float, list[float]]:
            """NNCF's metric: the int8 features' centred cosine against eager fp32 (and each image's, to rank by)."""
            items = list(items)
            features = torch.cat([torch.from_numpy(compiled(array)[0]) for array, _ in items])
            batch, per_image = centred_cosines(features, target[[index for _, index in items]])
            return float(batch), per_image.tolist()

        steering = nncf.Dataset(list(zip(batches, range(len(batches)))), lambda item: item[0])
        options = {"subset_size": len(batches), "model_type": nncf.ModelType.TRANSFORMER if transformer else None}

        def score(network) -> float:
            compiled = core.compile_model(network, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                           "INFERENCE_NUM_THREADS": torch.get_num_threads()})
            return centred_cosine(compiled, steering.get_data())[0]

        with _quiet():
            quantized = nncf.quantize(core.read_model(onnx_file), nncf.Dataset(batches), **options)
            plain = score(quantized)
            if plain < 1 - INT8_MAX_DROP:  # NNCF quantises afresh, then restores layers
                restored = nncf.quantize_with_accuracy_control(
                    core.read_model(onnx_file), nncf.Dataset(batches), steering, validation_fn=centred_cosine,
                    max_drop=INT8_MAX_DROP, drop_type=nncf.DropType.ABSOLUTE, **options,
                    advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                        ranking_subset_size=min(INT8_RANKING_IMAGES, len(batches))))
                # where no set of layers reaches the drop NNCF returns its last try, which can be worse than none
                quantized = restored if score(restored) > plain else quantized
        openvino.save_model(quantized, path, compress_to_fp16=False)

    return core.read_model(_cached(key, "model.xml", quantize))


class _SignalStack(ctypes.Structure):
    """POSIX ``stack_t``."""
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


@contextlib.contextmanager
def _keep_signal_stack():
    """Put the calling thread's alternate signal stack back as it was (Linux).

    OpenVINO's ``compile_model`` registers an alternate signal stack of its own (20 KB here) on the thread that
    calls it. Processes that later handled a signal on that thread (a finished child's SIGCHLD under a Python
    handler, as PyTorch's data loader installs) were killed by the kernel with SIGSEGV (``si_code`` SI_KERNEL: the
    signal frame could not be written there), with no traceback; the test suite lost worker processes this way.
    OpenVINO installs no handler that uses that stack, so the thread's own (none, or faulthandler's) is restored.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    saved = _SignalStack()
    libc.sigaltstack(None, ctypes.byref(saved))
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)


def _cached(key: str, filename: str, make: Callable[[Path], None]) -> Path:
    """``cache_dir()/key/filename``, made by ``make(path)`` in a scratch folder and moved in whole."""
    folder = cache_dir() / key
    if not (folder / filename).is_file():
        scratch = cache_dir() / f"{key}.{os.getpid()}.partial"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            make(scratch / filename)
            with contextlib.suppress(OSError):  # another process finished the same export first: keep theirs
                scratch.rename(folder)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return folder / filename


def _key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


@contextlib.contextmanager
def _quiet():
    """Exporters and quantisers talk a lot (tracer warnings, progress bars, INFO logs); none of it is the user's."""
    loggers = [logging.getLogger(name) for name in ("nncf", "torch.onnx", "onnxscript", "torch.utils.cpp_extension")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


# ---- measuring -----------------------------------------------------------------------------------------------------

def _measure(engine: Engine, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, float]:
    """The engine's features for ``images`` and its speed in images per second: the fastest batch after the first
    (which pays one-off costs), or a second run of a lone batch."""
    batches = list(images.split(batch_size))
    features, seconds = [], []
    for batch in batches + batches[:1] * (len(batches) == 1):
        start = time.perf_counter()
        features.append(engine(batch).float().cpu())
        seconds.append((time.perf_counter() - start) / len(batch))
    return torch.cat(features[:len(batches)]), round(1 / min(seconds[1:]), 2)


def _array(batch: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(batch.detach().cpu().float().numpy())


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__
