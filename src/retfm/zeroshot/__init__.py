"""Zero-shot disease recognition: an image-text model and prompts from the knowledge base."""
