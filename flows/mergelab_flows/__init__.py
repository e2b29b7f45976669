"""Prefect flows: thin wrappers over ``mergelab``."""
