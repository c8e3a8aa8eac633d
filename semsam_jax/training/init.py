"""Initial parameters of a run: scratch, converted Semantic-SAM weights, or an ImageNet Swin backbone.

* ``config.init.checkpoint``: an orbax checkpoint directory written by
  ``python -m semsam_jax.convert`` (or a training export), or an original
  ``.pth`` (converted on the fly, with ``config.init.reference_config`` =
  its YAML, or onto ``config.model`` when that is None).  Every parameter of
  the model must be in it, with the model's shape.
* ``config.init.backbone``: the Swin backbone from an ImageNet release
  (``swin_tiny_patch4_window7_224.pth``, ``swin_large_patch4_window12_384_22k.pth``:
  keys ``patch_embed.*``, ``layers.N.blocks.M.*``, ``layers.N.downsample.*``,
  ``norm.*``, ``head.*``), the rest from scratch.  Loading is strict: every
  key is used except the classifier (``head.*``), the final ``norm.*`` and the
  recomputed buffers (``attn_mask``, ``relative_position_index``, checked);
  every backbone parameter is filled except Semantic-SAM's per-stage output
  norms ``norm0..norm3`` (not in ImageNet checkpoints, from scratch, as in
  the original).  Anything else is an error listing the keys.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from flax import traverse_util

# ImageNet Swin keys with no counterpart in Semantic-SAM's backbone.
IMAGENET_IGNORED = (re.compile(r"^head\."), re.compile(r"^norm\.(weight|bias)$"),
                    re.compile(r"\.attn_mask$"))
# Backbone parameters an ImageNet checkpoint does not have.
BACKBONE_ONLY = re.compile(r"^norm\d+$")


class InitError(ValueError):
  """The initial weights do not fit the model (the message lists every key)."""


def _flat(tree):
  return traverse_util.flatten_dict(dict(tree))


def check_against(params, target, what: str):
  """Raises InitError unless ``params`` has exactly ``target``'s paths and shapes."""
  got, want = _flat(params), _flat(target)
  missing = sorted("/".join(k) for k in want if k not in got)
  unexpected = sorted("/".join(k) for k in got if k not in want)
  mism = sorted(f"{'/'.join(k)}: {tuple(got[k].shape)} vs model {tuple(want[k].shape)}"
                for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape))
  if missing or unexpected or mism:
    lines = [f"{what} does not match config.model:"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatch", mism)):
      if items:
        lines.append(f"{len(items)} {title}:")
        lines += [f"  {x}" for x in items]
    raise InitError("\n".join(lines))


def load_converted(config, target):
  """Params from ``config.init.checkpoint`` (orbax dir or .pth), checked against ``target``."""
  path = os.fspath(config.init.checkpoint)
  if os.path.isdir(path):
    from semsam_jax.convert.checkpoint import load_checkpoint
    _, params = load_checkpoint(path)
    params = jax.tree.map(np.asarray, params)
  else:
    from semsam_jax.convert import convert_checkpoint
    ref = config.init.get("reference_config", None)
    if ref:
      _, params = convert_checkpoint(path, reference_config=os.fspath(ref))
    else:
      _, params = convert_checkpoint(path, config=config.model)
  check_against(params, target, path)
  return params


def load_imagenet_backbone(path, backbone_target) -> tuple[dict, dict]:
  """Backbone params from an ImageNet Swin ``.pth``.

  Returns ``(params, report)``: ``params`` holds every backbone leaf except
  the ``norm0..3`` output norms; ``report`` lists the ``ignored`` checkpoint
  keys and the ``from_scratch`` backbone parameters.
  """
  from semsam_jax.convert.mapping import ConversionError, convert_state_dict
  from semsam_jax.convert.torch_pth import load_state_dict
  sd = load_state_dict(path)
  ignored = sorted(k for k in sd if any(p.search(k) for p in IMAGENET_IGNORED))
  prefixed = {}
  for k, v in sd.items():
    if k in ignored:
      continue
    if k.startswith(("backbone.", "model.", "module.")):
      raise InitError(f"{path}: key {k!r} is not in the ImageNet Swin layout "
                      "(use config.init.checkpoint for Semantic-SAM checkpoints)")
    prefixed["backbone." + k] = v
  flat = _flat(backbone_target)
  scratch = sorted(k for k in flat if BACKBONE_ONLY.fullmatch(k[0]))
  target = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in scratch})
  try:
    params = convert_state_dict(prefixed, target, prefix="backbone.")
  except ConversionError as e:
    raise InitError(f"{path}: not an ImageNet Swin checkpoint of this backbone "
                    f"(config.model.backbone):\n{e}") from e
  return params, {"ignored": ignored, "from_scratch": ["/".join(k) for k in scratch]}


def initial_params(config, rng, log=print):
  """Host (numpy) params for step 0 of ``config`` (see the module docstring)."""
  from semsam_jax.models import semantic_sam as ss
  init = config.get("init", None)
  ckpt = init.get("checkpoint", None) if init is not None else None
  backbone = init.get("backbone", None) if init is not None else None
  if ckpt and backbone:
    raise InitError("give config.init.checkpoint or config.init.backbone, not both")
  target = ss.param_shapes(config.model)
  if ckpt:
    params = load_converted(config, target)
    log(f"init: all {len(_flat(params))} parameters from {ckpt}")
    return params
  params = jax.tree.map(np.asarray, ss.init_params(
      config.model, rng, image_hw=(int(config.data.image_size),) * 2))
  if backbone:
    bb, report = load_imagenet_backbone(os.fspath(backbone), target["backbone"])
    flat = _flat(params)
    for k, v in _flat(bb).items():
      flat[("backbone",) + k] = v
    params = traverse_util.unflatten_dict(flat)
    log(f"init: backbone from {backbone} ({len(_flat(bb))} tensors); ignored keys "
        f"{report['ignored']}; from scratch: backbone {report['from_scratch']} and the "
        "pixel decoder and decoder")
  else:
    log("init: from scratch")
  return params
