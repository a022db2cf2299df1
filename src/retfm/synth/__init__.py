"""Synthetic fundus photographs: conditional diffusion training, sampling, and audits (DERETFound)."""
