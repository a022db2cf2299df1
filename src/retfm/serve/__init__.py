"""The screening service (``retfm serve``): an HTTP API and a web page over a fine-tuned classifier."""

from retfm.serve.app import create_app

__all__ = ["create_app"]
