"""Which NNCF int8 settings keep EfficientNet-Lite0's features? Feature fidelity only, on real photographs.

Calibration: the first 128 DR-graded training-split photographs of mexfundus (benchmarks/mexfundus.py); fidelity:
the 122 validation-split photographs (never test), each variant's OpenVINO int8 features against PyTorch fp32:
cosine mean and minimum per image, and the centred cosine over the batch (features less the fp32 mean), as
retfm's engine check computes it.

``accuracy control``: retfm's own int8 road (``nncf.quantize_with_accuracy_control``: quantised layers put back to
fp32, the most harmful first, until the centred cosine against PyTorch fp32 on the 128 calibration photographs is
within ``INT8_MAX_DROP``), judged on the validation photographs as the others; it also prints how many
FakeQuantize operations remain and the int8 model's speed against OpenVINO fp32 on one thread.

    python benchmarks/int8_variants.py [VARIANT ...]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import mexfundus
import nncf
import openvino
import torch
from torch.utils.data import DataLoader

from retfm.data.datasets import ManifestDataset, eval_transform
from retfm.data.manifest import Manifest
from retfm.models import create, preprocessing, spec
from retfm.models.engine import INT8_MAX_DROP, _array, _keep_signal_stack, _quantized, export_onnx, fidelity

HERE = Path(__file__).resolve().parent


def images(manifest: Manifest, split: str, n: int) -> torch.Tensor:
    table = manifest.table
    rows = table[table["referable_dr"].notna() & (table["split"] == split)].head(n).reset_index(drop=True)
    dataset = ManifestDataset(Manifest(rows, manifest.root), eval_transform(preprocessing(spec("efficientnet-lite0"))),
                              group_columns=())
    return torch.cat([batch["image"] for batch in DataLoader(dataset, batch_size=32)])


def main() -> None:
    torch.set_num_threads(1)
    manifest = Manifest.read(mexfundus.prepare(HERE / "_work" / "mexfundus"))
    calibration, held_out = images(manifest, "train", 128), images(manifest, "val", 122)
    model = create("efficientnet-lite0").eval()
    with torch.inference_mode():
        reference = model(held_out).float()
    onnx = export_onnx(model, "efficientnet-lite0-int8-variants", calibration[:2])
    core = openvino.Core()
    convolutions = [op.get_friendly_name() for op in core.read_model(onnx).get_ordered_ops()
                    if op.get_type_name() == "Convolution"]
    variants = {
        "defaults": {},
        "full bias correction": {"fast_bias_correction": False},
        "mixed preset": {"preset": nncf.QuantizationPreset.MIXED},
        "depthwise in fp32": {"ignored_scope": nncf.IgnoredScope(types=["GroupConvolution"])},
        "stem and head in fp32": {"ignored_scope": nncf.IgnoredScope(names=[convolutions[0], convolutions[-1]])},
        "head in fp32": {"ignored_scope": nncf.IgnoredScope(names=[convolutions[-1]])},
    }
    # The layers NNCF leaves unquantised run at the CPU's default inference precision: bf16 where the CPU has it
    # (as retfm's int8 engine runs them), unless a variant's name ends in "f32 elsewhere".
    variants |= {f"{name}, f32 elsewhere": options for name, options in variants.items()}
    batches = nncf.Dataset([_array(calibration[i:i + 1]) for i in range(len(calibration))])
    names = sys.argv[1:] or list(variants)
    if "accuracy control" in names:
        names.remove("accuracy control")
        print(json.dumps(accuracy_control(core, onnx, model, calibration, held_out, reference)), flush=True)
    for name in names:
        hint = {"INFERENCE_PRECISION_HINT": "f32"} if name.endswith("f32 elsewhere") else {}
        with _keep_signal_stack():  # OpenVINO replaces the thread's signal stack (retfm.models.engine)
            quantized = nncf.quantize(core.read_model(onnx), batches, subset_size=len(calibration), **variants[name])
            compiled = core.compile_model(quantized, "CPU", {"INFERENCE_NUM_THREADS": 1, **hint})
        features = torch.cat([torch.from_numpy(compiled(_array(held_out[i:i + 4]))[0])
                              for i in range(0, len(held_out), 4)])
        print(json.dumps({"variant": name, **fidelity(features, reference)}), flush=True)


def accuracy_control(core, onnx: Path, model: torch.nn.Module, calibration: torch.Tensor, held_out: torch.Tensor,
                     reference: torch.Tensor) -> dict:
    """retfm's int8 road itself (``retfm.models.engine._quantized``: NNCF with accuracy control), calibrated and
    steered on the calibration photographs, judged on the held-out ones; with its speed against OpenVINO fp32."""
    os.environ["RETFM_CACHE"] = tempfile.mkdtemp()  # quantise afresh, so that its time is measured
    start = time.perf_counter()
    with _keep_signal_stack():
        quantized = _quantized(core, onnx, "efficientnet-lite0-int8-variants", model, calibration)
        one_thread = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}
        engines = {"fp32": core.compile_model(core.read_model(onnx), "CPU", one_thread),
                   "int8": core.compile_model(quantized, "CPU", one_thread)}
    seconds = time.perf_counter() - start
    batches = [_array(held_out[i:i + 4]) for i in range(0, len(held_out), 4)]
    features = torch.cat([torch.from_numpy(engines["int8"](batch)[0]) for batch in batches])
    speeds = {}
    for name, engine in engines.items():
        engine(batches[0])
        began = time.perf_counter()
        for batch in batches:
            engine(batch)
        speeds[name] = round(len(held_out) / (time.perf_counter() - began), 1)
    quantizers = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
    return {"variant": f"accuracy control (retfm's int8, max_drop {INT8_MAX_DROP})", **fidelity(features, reference),
            "fake_quantize_ops": quantizers, "images_per_s_one_thread": speeds, "quantize_seconds": round(seconds)}


if __name__ == "__main__":
    main()
