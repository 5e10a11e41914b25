"""moejax: sparse Mixture-of-Experts layers, routers and experiments in JAX/Flax."""

import setuptools

# Compatible ranges: from the tested version (constraints.txt pins it, and
# `make` installs with `pip install -c constraints.txt`) up to the next
# release that may break the APIs moejax uses. jax/jaxlib: the CPU wheel;
# for GPU or TPU install jax[cuda12] / jax[tpu] (README, "Install").
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.12",
    "jaxlib>=0.10.2,<0.12",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "absl-py>=2.5.1,<3",
    "ml-collections>=1.1.0,<2",
    "tensorflow-datasets>=4.9.10,<5",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "numpy>=2.0,<3",
    # TensorBoard event files (moejax.train.writers), progress bar.
    "tensorboardX>=2.6.5,<3",
    "tqdm>=4.66,<5",
    # Reads and writes pretrained checkpoints (moejax.models.from_pretrained).
    "safetensors>=0.8.0,<1",
    # A pretrained model's tokenizer.json (moejax.data.tokenizer).
    "tokenizers>=0.23.3,<1",
]

EXTRAS_REQUIRE = {
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100",
             "chex>=0.1.92,<0.2",
             # Reads event files back (EventAccumulator) in the tests.
             "tensorboard>=2.21,<3"],
    "report": ["matplotlib>=3.8,<4"],
    # The embedded image dataset (sklearn_digits) is scikit-learn's bundled
    # 8x8 digits; building it without this extra names it.
    "digits": ["scikit-learn>=1.9.1,<2"],
    # experiments.sweep --launcher=slurm submits through submitit.
    "slurm": ["submitit>=1.5.4,<2"],
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
