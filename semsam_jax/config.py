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
          remat=False,            # legacy spelling of model.remat = "block"
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
      # Training: rematerialisation (jax.checkpoint via nn.remat) of the
      # forward pass, "none" or any combination of REMAT_GRANULARITIES
      # joined by "+" (e.g. "block+encoder_layer"): the activations inside each
      # rematerialised module are recomputed in the backward pass instead of
      # stored.  Values and gradients do not depend on it.
      remat="none",
      remat_policy="nothing_saveable",  # what a remat region keeps (REMAT_POLICIES)
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


# Modules model.remat can rematerialise: each Swin block, each Swin stage
# (its blocks and patch merging), each pixel-decoder encoder layer, each
# decoder layer.
REMAT_GRANULARITIES = ("block", "stage", "encoder_layer", "decoder_layer")
# model.remat_policy -> jax.checkpoint_policies member: what a remat region
# saves for the backward pass (everything else is recomputed).
REMAT_POLICIES = {
    "nothing_saveable": "nothing_saveable",
    "dots_saveable": "dots_saveable",
    "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable",
}
# Training-only model fields that configs written before they existed lack;
# a checkpoint's config.json may omit them (absent = the default).
OPTIONAL_MODEL_FIELDS = (("remat",), ("remat_policy",))


def remat_granularities(model_cfg) -> frozenset:
  """The set of :data:`REMAT_GRANULARITIES` that ``model_cfg`` (the model
  section) asks for.

  ``model.remat`` is "none", one granularity, several joined by "+" or ",",
  or a sequence of them; the legacy ``model.backbone.remat = True`` adds
  "block".  Raises ValueError on anything else.
  """
  def get(node, key, default):
    try:
      value = node[key]
    except (KeyError, AttributeError, TypeError):
      return default
    return default if value is None else value

  spec = get(model_cfg, "remat", "none")
  if isinstance(spec, bool):
    names = ["block"] if spec else []
  elif isinstance(spec, str):
    names = [n.strip() for n in spec.replace(",", "+").split("+") if n.strip()]
  else:
    names = [str(n).strip() for n in spec]
  names = [n for n in names if n != "none"]
  bad = [n for n in names if n not in REMAT_GRANULARITIES]
  if bad:
    raise ValueError(f"model.remat {spec!r}: unknown granularit{'y' if len(bad) == 1 else 'ies'} "
                     f"{bad}; choose 'none' or a combination of {list(REMAT_GRANULARITIES)}")
  out = set(names)
  if bool(get(get(model_cfg, "backbone", {}), "remat", False)):
    out.add("block")
  return frozenset(out)


def remat_policy(model_cfg):
  """The ``jax.checkpoint_policies`` function named by ``model.remat_policy``."""
  import jax
  try:
    name = model_cfg["remat_policy"]
  except (KeyError, AttributeError, TypeError):
    name = None
  name = "nothing_saveable" if name is None else str(name)
  if name not in REMAT_POLICIES:
    raise ValueError(f"model.remat_policy {name!r} is not one of {sorted(REMAT_POLICIES)}")
  return getattr(jax.checkpoint_policies, REMAT_POLICIES[name])


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

