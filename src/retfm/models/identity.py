"""Which embedding space vectors belong to: the model's name, a hash of its loaded weights and its preprocessing.
Embeddings, retrieval indexes and the screening service compare these before they compare vectors."""

from __future__ import annotations

import hashlib
import json

import torch

from retfm.models.registry import preprocessing

IDENTITY_KEYS = ("retfm.model", "retfm.weights_sha256", "retfm.preprocessing")


def embedding_identity(spec, model: torch.nn.Module) -> dict[str, str]:
    """The metadata (IDENTITY_KEYS) that says which embedding space vectors belong to: model, weights, preprocessing.
    Vectors with different identities cannot be compared."""
    pre = preprocessing(spec)
    return {"retfm.model": spec.name, "retfm.weights_sha256": weights_sha256(model),
            "retfm.preprocessing": json.dumps({"size": pre.size, "mean": list(pre.mean), "std": list(pre.std),
                                               "pooling": spec.pooling,
                                               "resize": f"antialiased {pre.interpolation}, from the stored image"})}


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of the model's tensors in name order: identifies the weights whatever file they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
