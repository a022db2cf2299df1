"""Encrypted, signed bundles of a de-identified ingest, for sites that upload images rather than train locally."""
