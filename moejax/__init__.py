"""moejax: sparse Mixture-of-Experts research in JAX/Flax.

Subpackages: `routing` (pure router functions, losses, metrics), `layers`
(dispatch engines and Flax NNX modules), `sharding`, `pallas`, `data`, `train`.
"""

__version__ = "0.1.0"
