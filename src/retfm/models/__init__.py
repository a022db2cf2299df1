"""The model zoo: named retinal foundation models, strict checkpoint loading, retfm checkpoints.

``create("retfound-green")`` gives the timm model with its published weights and pooling; ``preprocessing(spec)``
the resize and normalisation those weights expect.
"""

from retfm.models.backbones import create, load_weights, memory_format, save_checkpoint
from retfm.models.registry import ModelSpec, list_models, preprocessing, spec

__all__ = ["ModelSpec", "create", "list_models", "load_weights", "memory_format", "preprocessing", "save_checkpoint",
           "spec"]
