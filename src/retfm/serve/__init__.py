"""The screening service (``retfm serve``): an HTTP API and a web page over a fine-tuned classifier
(:func:`retfm.serve.app.create_app`)."""
