"""retfm: an open-source toolkit for retinal foundation models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("retfm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
