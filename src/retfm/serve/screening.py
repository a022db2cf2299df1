"""Screening one fundus photograph: quality first, then findings, an explanation and similar cases.

The steps a request goes through, split by where they run:

- :meth:`Screener.prepare` (per request, in a worker thread): safe decoding (``retfm.data.io``: format sniffing,
  decompression-bomb limit), the field-of-view crop and quality scores (``retfm.data.fundus``) exactly as
  ``retfm data ingest`` made the training images, then the model's own preprocessing. An image with no
  detectable fundus, or a quality score under ``min_quality``, is *ungradable*: it gets that verdict and the
  reasons, never findings;
- :meth:`Screener.run_batch` (per micro-batch, on the one model thread): one forward pass of the classifier over
  the gradable images of many requests, its features on the inference engine chosen at start
  (``retfm.models.engine``, checked on phantom fundus photographs against PyTorch eager fp32) and its last linear
  layer in PyTorch; a second pass, in PyTorch with gradients, of Grad-CAM (the ``grad-cam`` package, on the last
  transformer block or convolutional stage) over the images that asked for a heatmap, so an image's
  probabilities never depend on whether one was asked for; one forward pass of the retrieval index's own
  embedding model (on an engine too) and a FAISS search, when an index is served.

Decisions follow the model card: a binary classifier's finding is "positive" when the probability of its second
class reaches the threshold chosen on validation (Youden's J, by ``retfm finetune``); a multi-class one predicts
its most probable class. The risk that orders a triage list is the probability of the positive class (binary) or
one minus the probability of the first class (multi-class: the first class, in the card's sorted order, is taken
to be the no-finding grade, as grade 0 is for ``dr_grade``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from retfm.data import fundus
from retfm.data.datasets import eval_transform
from retfm.data.io import decode_image
from retfm.data.phantoms import render_fundus, site_profiles
from retfm.errors import RetfmError
from retfm.models import create, preprocessing, spec as model_spec
from retfm.models.engine import CALIBRATION_IMAGES, PreLogits, select
from retfm.models.identity import embedding_identity
from retfm.models.registry import card_path
from retfm.retrieval.index import RetrievalIndex, check_same_model
from retfm.serve.config import ServeConfig

HEATMAP_SIDE = 448  # the overlay's side in pixels: enough to see where, small enough for JSON
QUALITY_SCORES = ("quality_exposure", "quality_sharpness", "fov_fraction")


@dataclass
class Prepared:
    """One decoded upload: quality verdict, and for a gradable image its crop and model inputs."""

    quality: dict[str, float]
    gradable: bool
    reasons: list[str]
    crop: np.ndarray | None = None  # RGB uint8, the field of view as the model sees it
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # "classifier" and "retrieval" tensors


class Screener:
    """The served classifier (and retrieval index), loaded once; thread-safe as long as :meth:`run_batch` is
    called from one thread at a time (the micro-batcher's)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RetfmError("--device cuda: no CUDA device is available here (use --device cpu)")
        self.card = _read_card(config.model)
        self.classes = [str(c) for c in self.card["classes"]]
        self.task = self.card.get("task") or ("binary" if len(self.classes) == 2 else "multiclass")
        self.threshold = self.card.get("threshold") if self.task == "binary" else None
        self.model = create(config.model, num_classes=len(self.classes)).to(self.device).eval()
        self.transform = eval_transform(preprocessing(model_spec(config.model)))
        # The classifier's features run on an engine; its last linear layer stays in PyTorch, so the engine's
        # fidelity is judged on features, as retfm embed judges it. Heatmaps keep PyTorch (they need gradients).
        calibration = _calibration_crops(config.fundus_size)
        identity = json.dumps({**embedding_identity(model_spec(config.model), self.model), "output": "pre-logits"})
        self.features = select(PreLogits(self.model), torch.stack([self.transform(c) for c in calibration]), identity,
                               config.engine, config.precision, config.batch_size, device=config.device)
        self.head = self.model.get_classifier()
        self.index = None
        if config.index is not None:
            self.index, embedder, self.embed_transform = _load_index(config.index, self.device)
            self.embedder = select(embedder, torch.stack([self.embed_transform(c) for c in calibration]),
                                   json.dumps(embedding_identity(model_spec(self.index.meta.get("embed_model") or
                                                                            self.index.meta.get("model")), embedder)),
                                   config.engine, config.precision, config.batch_size, device=config.device)
            labels = self.index.meta.get("label_columns") or []
            self.case_label = self.card.get("label") if self.card.get("label") in labels else (labels or [None])[0]

    def with_config(self, config: ServeConfig) -> Screener:
        """This loaded model under other request limits and quality gate (the model, index and device stay)."""
        loaded = ("model", "index", "device", "engine", "precision")
        if any(getattr(config, name) != getattr(self.config, name) for name in loaded):
            raise ValueError(f"with_config changes limits only, not {', '.join(loaded)}")
        copy = object.__new__(Screener)
        copy.__dict__.update(self.__dict__, config=config)
        return copy

    # ---- per request ----------------------------------------------------------------------------------------------

    def prepare(self, data: bytes) -> Prepared:
        """Decode and quality-check one upload. Raises ``retfm.data.io.ImageRejected`` when it is no image."""
        decoded = decode_image(data, min_side=self.config.fundus_size, max_pixels=self.config.max_pixels)
        found = fundus.preprocess(decoded.rgb, self.config.fundus_size)
        if found is None:
            return Prepared({}, False, ["no fundus field of view was found in the image"])
        crop, info = found
        scores = {name: round(float(info[name]), 4) for name in ("quality", *QUALITY_SCORES)}
        if scores["quality"] < self.config.min_quality:
            weakest = min(QUALITY_SCORES, key=lambda name: scores[name])
            return Prepared(scores, False, [f"quality {scores['quality']:.2f} is below {self.config.min_quality:.2f}; "
                                            f"weakest: {weakest.removeprefix('quality_')} {scores[weakest]:.2f}"])
        picture = Image.fromarray(crop)
        inputs = {"classifier": self.transform(picture)}
        if self.index is not None:
            inputs["retrieval"] = self.embed_transform(picture)
        return Prepared(scores, True, [], crop, inputs)

    # ---- per micro-batch ------------------------------------------------------------------------------------------

    def run_batch(self, items: list[tuple[Prepared, bool]]) -> list[dict]:
        """Findings for gradable prepared images, each with a heatmap when its flag asks for one: one classifier
        forward pass and one embedding pass for the whole batch, and a Grad-CAM pass over those wanting a heatmap."""
        images = torch.stack([prepared.inputs["classifier"] for prepared, _ in items]).to(self.device)
        with torch.inference_mode():
            logits = self.head(self.features(images).to(self.device))
        probabilities = torch.softmax(logits.float(), dim=1).cpu().numpy()
        # Heatmaps come from a second, PyTorch pass with gradients over the images that asked for one, so an
        # image's probabilities never depend on whether a heatmap was wanted or what it was batched with.
        wanted = [row for row, (_, explain) in enumerate(items) if explain]
        heat = dict(zip(wanted, self._gradcam(images[wanted]))) if wanted else {}
        cases = self._similar_cases(torch.stack([p.inputs["retrieval"] for p, _ in items])) if self.index else None
        results = []
        for row, (prepared, explain) in enumerate(items):
            result = self.findings(probabilities[row])
            if row in heat:
                result["heatmap"] = {"png_base64": _overlay_png(prepared.crop, heat[row]),
                                     "method": f"Grad-CAM, {self._explained_layer}",
                                     "class": self._explained(probabilities[row])}
            if cases is not None:
                result["similar_cases"] = cases[row]
            results.append(result)
        return results

    def findings(self, probabilities: np.ndarray) -> dict:
        """Per-class probabilities, the decision the card's operating point makes, and the triage risk."""
        per_class = [{"class": c, "probability": round(float(p), 6)} for c, p in zip(self.classes, probabilities)]
        if self.task == "binary" and self.threshold is not None:
            positive = bool(probabilities[1] >= self.threshold)
            prediction = self.classes[1] if positive else self.classes[0]
            rule = (f"{self.card.get('label', 'finding')} = {self.classes[1]} when its probability is at least "
                    f"{self.threshold:.4f} (threshold chosen on validation)")
        else:
            positive = None
            prediction = self.classes[int(np.argmax(probabilities))]
            rule = "the most probable class"
        risk = float(probabilities[1]) if self.task == "binary" else float(1 - probabilities[0])
        return {"label": self.card.get("label"), "task": self.task, "probabilities": per_class,
                "threshold": self.threshold, "prediction": prediction, "positive": positive, "decision_rule": rule,
                "risk": round(risk, 6)}

    def _explained(self, probabilities: np.ndarray) -> str:
        """The class a heatmap explains: the finding (binary), else the predicted class."""
        return self.classes[1] if self.task == "binary" else self.classes[int(np.argmax(probabilities))]

    def _gradcam(self, images: torch.Tensor) -> np.ndarray:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        # The CAM is built per batch: its hooks then live only while it runs, so plain forwards keep nothing.
        # Targets: the finding's logit (binary); None lets Grad-CAM explain each image's predicted class.
        targets = [ClassifierOutputTarget(1)] * len(images) if self.task == "binary" else None
        if self._explained_layer == "last transformer block":  # its tokens, laid out on the patch grid
            layer, reshape = self.model.blocks[-1].norm1, self._tokens_to_grid
        else:
            layer, reshape = self.model.get_submodule(self.model.feature_info[-1]["module"]), None
        with torch.enable_grad(), GradCAM(self.model, [layer], reshape_transform=reshape) as cam:
            return cam(input_tensor=images, targets=targets)

    @property
    def _explained_layer(self) -> str:
        return "last transformer block" if hasattr(self.model, "patch_embed") else "last convolutional stage"

    def _tokens_to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """ViT tokens (B, N, C) -> (B, C, H, W) over the patch grid, without the class and register tokens."""
        height, width = self.model.patch_embed.grid_size
        patches = tokens[:, self.model.num_prefix_tokens:, :]
        return patches.reshape(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)

    @torch.inference_mode()
    def _similar_cases(self, images: torch.Tensor) -> list[list[dict]]:
        vectors = self.embedder(images).float().cpu().numpy()
        hits = self.index.search(vectors, self.config.k)
        cases: list[list[dict]] = [[] for _ in range(len(vectors))]
        for row in hits.itertuples(index=False):
            values = row._asdict()
            cases[values["query"]].append({
                "image_id": str(values["image_id"]),
                "label": _plain(values.get(self.case_label)) if self.case_label else None,
                "site": _plain(values.get("site")), "similarity": round(float(values["similarity"]), 6)})
        return cases

    # ---- the model card ------------------------------------------------------------------------------------------

    def model_card(self) -> dict:
        """What a clinician should know before trusting the output: the card, and the evaluation beside it."""
        card = {k: v for k, v in self.card.items() if k not in ("weights", "source")}
        evaluation_file = Path(self.config.model).parent / "metrics.json"
        evaluation = json.loads(evaluation_file.read_text()) if evaluation_file.is_file() else {}
        meta = evaluation.get("meta", {})
        return {
            "name": card.get("name"), "description": card.get("description"), "label": card.get("label"),
            "classes": self.classes, "task": self.task, "threshold": self.threshold,
            "licence": card.get("licence"),
            "training": {"adaptation": card.get("adaptation"), "base_model": card.get("base_model"),
                         "images_seen": card.get("images_seen"), "compute": card.get("compute"),
                         "train_images": meta.get("train_rows"), "validation_images": meta.get("selection_rows"),
                         "label_fraction": meta.get("label_fraction")},
            "evaluation": {"test_images": evaluation.get("n"), "metrics": card.get("metrics") or
                           evaluation.get("metrics"), "groups": evaluation.get("groups"),
                           "gaps": evaluation.get("gaps"), "notes": evaluation.get("notes")},
            "quality_gate": {"min_quality": self.config.min_quality, "scores": list(QUALITY_SCORES)},
            "intended_use": card.get("intended_use") or (
                "Research and decision support for trained readers of colour fundus photographs: triage and second "
                "reading. Not a medical device; not for diagnosis without a clinician."),
            "limits": card.get("limits") or (
                "Evaluated only on the test split named above; performance on other cameras, populations and "
                "disease prevalence is unknown until measured there (see groups). Heatmaps show where the model "
                "looked, not where disease is. Images it cannot grade are reported as such, never guessed."),
            "index": None if self.index is None else {"images": len(self.index), "model": self.index.meta.get("model"),
                                                      "label": self.case_label},
        }


def _read_card(model: Path) -> dict:
    card_file = card_path(Path(model))
    model_spec(model)  # the checkpoint and its card exist and describe a loadable model (one clear error if not)
    card = json.loads(card_file.read_text())
    if not card.get("classes") or len(card["classes"]) < 2:
        raise RetfmError(f"{card_file}: not a classifier card (no classes); serve a model from `retfm finetune`")
    return card


def _load_index(folder: Path, device: torch.device):
    """The index and its own embedding model, refused unless the model's identity is the index's."""
    index = RetrievalIndex.load(folder)
    name = index.meta.get("embed_model") or index.meta.get("model")
    weights = index.meta.get("embed_weights")
    if not name:
        raise RetfmError(f"{folder}: the index does not name the model its embeddings came from")
    if weights == "random":
        raise RetfmError(f"{folder}: built from randomly initialised weights, which cannot be made again")
    embedder = create(name, weights=weights).to(device).eval()
    check_same_model(index, embedding_identity(model_spec(name), embedder), str(name))
    return index, embedder, eval_transform(preprocessing(model_spec(name)))


def _calibration_crops(size: int, count: int = CALIBRATION_IMAGES) -> list[Image.Image]:
    """Phantom fundus photographs (retfm.data.phantoms), cropped as uploads are: the images the engines are
    checked on at start, when no real photograph has arrived yet."""
    site = site_profiles(1, seed=0)[0]
    crops = []
    for i in range(count):
        rgb, _ = render_fundus(np.random.default_rng(i), size, eye="RL"[i % 2], dr_grade=i % 5, cdr=0.3 + 0.02 * i,
                               amd=i % 4 == 3, site=site)
        found = fundus.preprocess(rgb, size)
        crops.append(Image.fromarray(found[0] if found else rgb))
    return crops


def _overlay_png(crop: np.ndarray, heat: np.ndarray) -> str:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    side = min(HEATMAP_SIDE, crop.shape[0])
    picture = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    mask = cv2.resize(heat.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    overlay = show_cam_on_image(picture, np.clip(mask, 0, 1), use_rgb=True, image_weight=0.6)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("could not encode the heatmap as PNG")
    return base64.b64encode(encoded.tobytes()).decode("ascii")


def _plain(value):
    """A table value as JSON: numpy scalars unwrapped, missing as None."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value

