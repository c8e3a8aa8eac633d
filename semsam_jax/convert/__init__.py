"""Conversion of original (PyTorch) Semantic-SAM checkpoints to Flax.

Typical use::

    from semsam_jax.convert import convert_checkpoint, save_checkpoint, load_checkpoint
    config, params = convert_checkpoint("swint_only_sam_many2many.pth",
                                        reference_config="semantic_sam_only_sa-1b_swinT.yaml")
    save_checkpoint("ckpt/swint", params, config)
    config, params = load_checkpoint("ckpt/swint")

or from the shell: ``python -m semsam_jax.convert --help``.
"""

from __future__ import annotations

import os

from semsam_jax.convert.checkpoint import (CheckpointError, load_checkpoint, model_section,
                                           save_checkpoint)
from semsam_jax.convert.mapping import ConversionError, convert_state_dict
from semsam_jax.convert.reference_config import config_from_reference_yaml
from semsam_jax.convert.torch_pth import CheckpointReadError, load_state_dict

__all__ = [
    "CheckpointError", "CheckpointReadError", "ConversionError", "config_from_reference_yaml",
    "convert_checkpoint", "convert_state_dict", "load_checkpoint", "load_state_dict",
    "model_section", "save_checkpoint",
]


def convert_checkpoint(torch_checkpoint: str | os.PathLike, reference_config=None,
                       config=None):
  """Reads an original ``.pth`` checkpoint and converts it to Flax params.

  Args:
    torch_checkpoint: path of the PyTorch checkpoint (zip or legacy format; a
      bare state dict or ``{'model': state_dict}``; keys with or without the
      ``model.`` prefix).
    reference_config: the original Semantic-SAM YAML the checkpoint was
      trained with (path, list of paths or loaded dict).
    config: alternatively, one of our configs (``configs/*.py``
      ``get_config()`` or its ``.model`` section).  Give exactly one of the two.

  Returns:
    ``(config, params)``: the ``model`` config section and a nested dict of
    numpy arrays with exactly the structure, shapes and dtypes of
    ``SemanticSAM(config).init(...)["params"]``.

  Raises:
    CheckpointReadError: unreadable file.  ConversionError: the tensors do not
    fit the model (every missing / unexpected / mis-shaped key is listed).
    ValueError: unsupported reference config.
  """
  if (reference_config is None) == (config is None):
    raise ValueError("give exactly one of reference_config (original YAML) or config")
  if reference_config is not None:
    cfg = config_from_reference_yaml(reference_config)
  else:
    cfg = model_section(config)
  state_dict = load_state_dict(torch_checkpoint)
  from semsam_jax.models import semantic_sam  # heavy import, only when converting
  target = semantic_sam.param_shapes(cfg)
  params = convert_state_dict(state_dict, target)
  return cfg, params
