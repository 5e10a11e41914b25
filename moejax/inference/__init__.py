"""Decoding: KV caches, sampling and generate."""
