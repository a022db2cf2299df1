"""Which NNCF int8 settings keep EfficientNet-Lite0's features? Feature fidelity only, on real photographs.

Calibration: the first 128 DR-graded training-split photographs of mexfundus (benchmarks/mexfundus.py); fidelity:
the 122 validation-split photographs (never test), each variant's OpenVINO int8 features against PyTorch fp32:
cosine mean and minimum per image, and the centred cosine over the batch (features less the fp32 mean), as
retfm's engine check computes it.

    python benchmarks/int8_variants.py [VARIANT ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mexfundus
import nncf
import openvino
import torch
from torch.utils.data import DataLoader

from retfm.data.datasets import ManifestDataset, eval_transform
from retfm.data.manifest import Manifest
from retfm.models import create, preprocessing, spec
from retfm.models.engine import _array, _keep_signal_stack, export_onnx, fidelity

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
    for name in sys.argv[1:] or variants:
        hint = {"INFERENCE_PRECISION_HINT": "f32"} if name.endswith("f32 elsewhere") else {}
        with _keep_signal_stack():  # OpenVINO replaces the thread's signal stack (retfm.models.engine)
            quantized = nncf.quantize(core.read_model(onnx), batches, subset_size=len(calibration), **variants[name])
            compiled = core.compile_model(quantized, "CPU", {"INFERENCE_NUM_THREADS": 1, **hint})
        features = torch.cat([torch.from_numpy(compiled(_array(held_out[i:i + 4]))[0])
                              for i in range(0, len(held_out), 4)])
        print(json.dumps({"variant": name, **fidelity(features, reference)}), flush=True)


if __name__ == "__main__":
    main()
