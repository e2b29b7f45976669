"""Prefect flows: thin wrappers over ``mergelab`` (DESIGN §8)."""
