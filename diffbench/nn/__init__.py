"""Shared neural-network layers used by the built-in models (attention, time embeddings, adaLN)."""
