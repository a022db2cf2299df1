"""Zero-shot use of foundation models: case retrieval, and (later) disease recognition from text prompts."""
