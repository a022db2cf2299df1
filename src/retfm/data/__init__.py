"""The data layer: manifests, safe decoding, fundus preprocessing, de-identification, sources, phantoms."""

from retfm.data.manifest import Manifest, ManifestError

__all__ = ["Manifest", "ManifestError"]
