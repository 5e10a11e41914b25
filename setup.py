"""moejax: sparse Mixture-of-Experts layers, routers and experiments in JAX/Flax."""

import setuptools

# Pinned to the versions that resolve together here (see docs/design.md).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "absl-py==2.5.1",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array-record==0.8.6",
    # Bundles the 8x8 digits: moejax.data's embedded image dataset.
    "scikit-learn==1.9.1",
    "numpy>=2.0",
    # Reads and writes pretrained checkpoints (moejax.models.from_pretrained).
    "safetensors==0.8.0",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100"],
    "report": ["matplotlib>=3.8"],
    # tf.data input (tfds.load) needs TensorFlow; the default path does not.
    "tf": ["tensorflow-cpu"],
}

setuptools.setup(
    name="moejax",
    version="0.1.0",
    description="Sparse Mixture-of-Experts research library for JAX/Flax",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["moejax", "moejax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
