"""Command line: convert an original Semantic-SAM ``.pth`` into an orbax checkpoint.

    python -m semsam_jax.convert --torch-checkpoint swint_only_sam_many2many.pth \
        --reference-config semantic_sam_only_sa-1b_swinT.yaml --output ckpt/swint
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from semsam_jax import _cli
from semsam_jax.config import load_config_file

MAX_ERROR_LINES = 40


def build_parser() -> argparse.ArgumentParser:
  from semsam_jax import __version__
  parser = argparse.ArgumentParser(
      prog="python -m semsam_jax.convert",
      description="Convert an original PyTorch Semantic-SAM checkpoint (.pth) into a "
                  "semsam_jax checkpoint directory (orbax params + config.json). "
                  "No torch installation is needed.")
  parser.add_argument("--version", action="version", version=f"semsam_jax {__version__}")
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


def _message(e: BaseException, args) -> str:
  """``error: ...`` text like the main CLI's, naming the file concerned."""
  name = type(e).__name__
  msg = str(e)
  if isinstance(e, FileNotFoundError) and e.filename:
    msg = f"file not found: {e.filename}"
  if name == "ConversionError":
    msg = f"{args.torch_checkpoint}: {msg}"
  elif isinstance(e, MemoryError):
    msg = f"out of memory while converting {args.torch_checkpoint}"
  elif not isinstance(e, (FileNotFoundError, FileExistsError)):
    files = [str(f) for f in [args.torch_checkpoint, args.config]
             + list(args.reference_config or []) if f]
    if not any(f in msg for f in files):
      msg = f"{args.torch_checkpoint}: {msg}"
  return msg


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    import numpy as np

    from semsam_jax.convert import convert_checkpoint, save_checkpoint
    out = pathlib.Path(args.output)
    if out.exists() and not args.overwrite:
      raise FileExistsError(f"{out} already exists (use --overwrite to replace it)")
    for f in [args.torch_checkpoint, args.config] + list(args.reference_config or []):
      if f and not os.path.isfile(f):
        raise FileNotFoundError(f"file not found: {f}")
    if args.reference_config:
      ref = args.reference_config[0] if len(args.reference_config) == 1 else args.reference_config
      config, params = convert_checkpoint(args.torch_checkpoint, reference_config=ref)
    else:
      config, params = convert_checkpoint(args.torch_checkpoint,
                                          config=load_config_file(args.config))
    import jax
    leaves = jax.tree_util.tree_leaves(params)
    num_params = sum(int(np.prod(x.shape)) for x in leaves)
    path = save_checkpoint(out, params, config, overwrite=args.overwrite)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return _cli.EXIT_INTERRUPTED
  except Exception as e:  # report the message, not a traceback
    print(_cli.error_lines(_message(e, args), MAX_ERROR_LINES), file=sys.stderr)
    if type(e).__name__ == "ConversionError":
      print("hint: does the config (--reference-config / --config) describe the "
            "architecture of this checkpoint?", file=sys.stderr)
    return 1
  b = config.backbone
  print(f"converted {args.torch_checkpoint}")
  print(f"  model: Swin embed {b.embed_dim}, depths {list(b.depths)}; "
        f"{config.decoder.num_layers} decoder layers, {config.decoder.num_mask_tokens} tokens")
  print(f"  {len(leaves)} tensors, {num_params:,} parameters")
  print(f"  written to {path}")
  return 0


if __name__ == "__main__":
  _cli.exit_on_interrupt()
  sys.exit(main())
