"""Interactive prediction and automatic mask generation.

* :class:`SemanticSAMPredictor` -- embed an image once, decode clicks/boxes
  into up to six granularity masks each;
* :class:`SemanticSAMAutomaticMaskGenerator` -- whole-image segmentation at
  chosen granularity levels;
* :mod:`~semsam_jax.inference.postprocess` -- the original's mask selection and
  cleanup, NMS, stability scores, COCO RLE.
"""

from semsam_jax.inference.predictor import (LEVEL_TO_TOKEN, SIZE_BUCKETS, TOKEN_TO_LEVEL,
                                            Prediction, SemanticSAMPredictor,
                                            levels_to_tokens, to_rgb_uint8,
                                            user_levels_to_tokens)
from semsam_jax.inference.automatic import SemanticSAMAutomaticMaskGenerator, point_grid
from semsam_jax.inference.postprocess import select_multi_masks

__all__ = [
    "LEVEL_TO_TOKEN", "SIZE_BUCKETS", "TOKEN_TO_LEVEL", "Prediction", "SemanticSAMPredictor",
    "SemanticSAMAutomaticMaskGenerator", "levels_to_tokens", "point_grid",
    "select_multi_masks", "to_rgb_uint8", "user_levels_to_tokens",
]
