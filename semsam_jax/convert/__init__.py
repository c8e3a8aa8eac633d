"""Conversion of original (PyTorch) Semantic-SAM checkpoints to Flax."""

from semsam_jax.convert.mapping import ConversionError, convert_state_dict
from semsam_jax.convert.torch_pth import CheckpointReadError, load_state_dict
