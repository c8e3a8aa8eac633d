"""Model configuration schema (``ml_collections.ConfigDict``).

``model_config()`` returns the SwinT SA-1B architecture; the files in ``configs/``
override fields of it.  Every field a module reads is listed here so that a
config built from an original Semantic-SAM YAML (see
:func:`semsam_jax.convert.reference_config.config_from_reference_yaml`) and one
built from ``configs/*.py`` are interchangeable.
"""

from __future__ import annotations

import ml_collections

SWIN_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
SWIN_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))


def model_config(backbone: str = "swin_t") -> ml_collections.ConfigDict:
  """Architecture of Semantic-SAM (defaults: SwinT, SA-1B release)."""
  swin = {"swin_t": SWIN_T, "swin_l": SWIN_L}[backbone]
  if backbone == "swin_l":
    pretrain_img_size, window_size = 384, 12
  else:
    pretrain_img_size, window_size = 224, 7
  return ml_collections.ConfigDict(dict(
      backbone=dict(
          embed_dim=swin["embed_dim"],
          depths=swin["depths"],
          num_heads=swin["num_heads"],
          window_size=window_size,
          patch_size=4,
          mlp_ratio=4.0,
          qkv_bias=True,
          qk_scale=None,          # None -> head_dim ** -0.5
          ape=False,              # absolute position embedding (unused by releases)
          patch_norm=True,
          pretrain_img_size=pretrain_img_size,
          out_features=("res2", "res3", "res4", "res5"),
          drop_path_rate=0.3,     # training only
          remat=False,            # training: rematerialise each Swin block (nn.remat)
      ),
      pixel_decoder=dict(
          conv_dim=256,
          mask_dim=256,
          norm="GN",
          num_groups=32,
          num_heads=8,            # reference: MODEL.DECODER.NHEADS
          dim_feedforward=2048,   # reference: MODEL.DECODER.DIM_FEEDFORWARD
          dropout=0.0,
          num_encoder_layers=6,   # reference: MODEL.ENCODER.TRANSFORMER_ENC_LAYERS
          n_points=4,
          in_features=("res2", "res3", "res4", "res5"),
          transformer_in_features=("res3", "res4", "res5"),
          num_feature_levels=3,
          total_num_feature_levels=4,
          common_stride=4,
          feature_order="low2high",
      ),
      decoder=dict(
          hidden_dim=256,
          num_heads=8,
          dim_feedforward=2048,
          num_layers=9,
          num_mask_tokens=6,
          n_points=4,
          total_num_feature_levels=4,
          mask_dim=256,
          dim_proj=512,
          dropout=0.0,
      ),
      pixel_mean=(123.675, 116.28, 103.53),
      pixel_std=(58.395, 57.12, 57.375),
      size_divisibility=32,
      # Numerics / implementation choices (not part of the checkpoint).
      dtype="float32",            # compute dtype; "bfloat16" is opt-in
      param_dtype="float32",
      msda_impl="auto",           # deformable attention core: auto|gather|patch|fused|cpu_native
      window_attention_impl="auto",  # Swin window attention: auto|xla|cpu_native
      # Token chunking (0: all tokens at once).  Per-token work runs in loops
      # over chunks of about this many tokens, which keeps intermediates in
      # the CPU caches; only speed and memory depend on it, not the results.
      # Swin blocks (rounded to whole windows):
      backbone_token_chunk=1024,
      # Pixel-decoder encoder layers (value projection, and everything per
      # query after the sampling) and the decoder's per-layer memory projection:
      memory_token_chunk=1024,
  ))


def load_config_file(path: str):
  """``get_config()`` of a ``configs/*.py`` file.

  Raises FileNotFoundError when the file is missing and ValueError (naming the
  file and the error) when it does not execute or defines no ``get_config``.
  """
  import importlib.util
  import pathlib
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_semsam_config_{p.stem}", p)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise ValueError(f"cannot load config {path}: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise ValueError(f"config {path} has no get_config()")
  return module.get_config()

