"""Command line: convert an original Semantic-SAM ``.pth`` into an orbax checkpoint.

    python -m semsam_jax.convert --torch-checkpoint swint_only_sam_many2many.pth \
        --reference-config semantic_sam_only_sa-1b_swinT.yaml --output ckpt/swint
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

MAX_ERROR_LINES = 40


def _load_py_config(path: str):
  """``get_config()`` of a configs/*.py file."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_semsam_config_{p.stem}", p)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config()")
  return module.get_config()


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m semsam_jax.convert",
      description="Convert an original PyTorch Semantic-SAM checkpoint (.pth) into a "
                  "semsam_jax checkpoint directory (orbax params + config.json). "
                  "No torch installation is needed.")
  parser.add_argument("--torch-checkpoint", required=True, metavar="PTH",
                      help="the PyTorch checkpoint (zip or legacy torch.save format, e.g. "
                           "swint_only_sam_many2many.pth)")
  arch = parser.add_mutually_exclusive_group(required=True)
  arch.add_argument("--reference-config", metavar="YAML", nargs="+",
                    help="the original Semantic-SAM YAML config the checkpoint belongs to "
                         "(e.g. configs/semantic_sam_only_sa-1b_swinT.yaml); several files "
                         "are merged like the original loader, later ones winning")
  arch.add_argument("--config", metavar="PY",
                    help="one of our config files instead (e.g. configs/semsam_swint.py, "
                         "which must define get_config())")
  parser.add_argument("--output", required=True, metavar="DIR",
                      help="checkpoint directory to write (must not exist unless --overwrite)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace DIR if it already exists")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    import numpy as np

    from semsam_jax.convert import convert_checkpoint, save_checkpoint
    out = pathlib.Path(args.output)
    if out.exists() and not args.overwrite:
      raise FileExistsError(f"{out} already exists (use --overwrite to replace it)")
    if args.reference_config:
      ref = args.reference_config[0] if len(args.reference_config) == 1 else args.reference_config
      config, params = convert_checkpoint(args.torch_checkpoint, reference_config=ref)
    else:
      config, params = convert_checkpoint(args.torch_checkpoint,
                                          config=_load_py_config(args.config))
    import jax
    leaves = jax.tree_util.tree_leaves(params)
    num_params = sum(int(np.prod(x.shape)) for x in leaves)
    path = save_checkpoint(out, params, config, overwrite=args.overwrite)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # report the message, not a traceback
    lines = f"error: {type(e).__name__}: {e}".splitlines()
    if len(lines) > MAX_ERROR_LINES:
      lines = lines[:MAX_ERROR_LINES] + [f"  ... ({len(lines) - MAX_ERROR_LINES} more lines)"]
    if type(e).__name__ == "ConversionError":
      lines.append("hint: does the config (--reference-config / --config) describe the "
                   "architecture of this checkpoint?")
    print("\n".join(lines), file=sys.stderr)
    return 1
  b = config.backbone
  print(f"converted {args.torch_checkpoint}")
  print(f"  model: Swin embed {b.embed_dim}, depths {list(b.depths)}; "
        f"{config.decoder.num_layers} decoder layers, {config.decoder.num_mask_tokens} tokens")
  print(f"  {len(leaves)} tensors, {num_params:,} parameters")
  print(f"  written to {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
