"""A model over a manifest's images: what embedding, fine-tuning's evaluation, a federated site's probe and the
synthetic-image audit share."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from retfm.data.datasets import ManifestDataset
from retfm.data.manifest import Manifest


@torch.inference_mode()
def manifest_outputs(forward: Callable[[torch.Tensor], torch.Tensor], manifest: Manifest, transform,
                     batch_size: int, workers: int = 0, decode_size: int | None = None,
                     pin_memory: bool = False) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (image ids, outputs as float32 rows) for each batch of ``manifest``'s images, in row order, under
    ``torch.inference_mode``. Images are decoded in ``workers`` loader processes (JPEGs at a reduced scale still
    at least ``decode_size``) and ``transform``ed; ``forward(images)`` runs the caller's model on a CPU batch
    (moving it to the model's device, under its precision) and returns one row per image."""
    dataset = ManifestDataset(manifest, transform, group_columns=(), decode_size=decode_size)
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory):
        yield batch["image_id"], forward(batch["image"]).float().cpu().numpy()
