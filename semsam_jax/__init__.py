"""semsam_jax: a JAX/Flax reimplementation of Semantic-SAM."""

__version__ = "0.1.0"
