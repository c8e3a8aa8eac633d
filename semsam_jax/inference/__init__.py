"""Interactive prediction and automatic mask generation."""

from semsam_jax.inference.predictor import (LEVEL_TO_TOKEN, Prediction, SemanticSAMPredictor,
                                            levels_to_tokens, to_rgb_uint8,
                                            user_levels_to_tokens)
from semsam_jax.inference.automatic import SemanticSAMAutomaticMaskGenerator
