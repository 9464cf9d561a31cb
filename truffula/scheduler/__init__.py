"""Continuous batching: token-budget scheduling over a pool of KV-cache blocks."""
