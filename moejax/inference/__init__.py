"""Decoding and analysis of trained or pretrained models: KV caches, sampling,
generate, routing statistics, and one checkpoint loader for the apps."""

from moejax.inference.decoding import generate
