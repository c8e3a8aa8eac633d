"""Command line: ``python -m semsam_jax {predict,auto} ...``.

predict: clicks/boxes on an image -> the masks of the chosen granularity
  levels: PNG strips (kept masks sorted by predicted IoU and by area, as the
  original demo shows them, the prompt drawn in red) and predictions.json
  (scores, boxes and every mask as COCO RLE; --mask-pngs adds one PNG per mask).
auto:    whole-image mask generation at the chosen levels -> a coloured
  overlay PNG and masks.json of SAM-style records with COCO-RLE masks.

The model comes from an orbax checkpoint written by ``python -m
semsam_jax.convert`` or ``train.py`` (--checkpoint) or from an original .pth +
YAML (--torch-checkpoint with --reference-config, converted on the fly).
Without either, the committed tiny checkpoint (``semsam_jax/assets/tiny``:
configs/tiny.py trained on the synthetic data, docs/demo.md) is used; it
segments the synthetic images, not natural ones.

Like the original demos, the image is first resized (bicubic) so that its
short side is --short-side pixels (640 by default; 0 keeps the input size),
the long side capped at --max-long-side.  Pixel prompts refer to the input
image (as a viewer shows it: EXIF orientation applied); every output (masks,
boxes, point coordinates) refers to the processed image, whose size is in the
JSON; --short-side 0 makes both frames the same.
Levels are the user granularity levels 1 (finest) .. 6 (coarsest).

Outputs are written to a temporary folder beside --output-dir and moved into
it at the end (earlier outputs of the same kind are replaced, stale ones
removed).  Compiled XLA code is cached in ~/.cache/semsam_jax/jax_cache
($SEMSAM_JAX_COMPILE_CACHE_DIR; off with --no-compile-cache or
SEMSAM_JAX_COMPILE_CACHE=0), so repeated calls on images of the same padded
size do not compile again.  Ctrl-C exits with status 130.
"""

from __future__ import annotations

if __name__ == "__main__":  # before jax starts any thread (see _cli.exit_on_interrupt)
  from semsam_jax import _cli as _early_cli
  _early_cli.exit_on_interrupt()

import argparse
import contextlib
import json
import math
import os
import re
import sys

import numpy as np

from semsam_jax import _cli
from semsam_jax.inference.io import (DEFAULT_MAX_LONG_SIDE, DEFAULT_MAX_PIXELS, ImageError,
                                     load_image, processed_size, resize_image)

MAX_ERROR_LINES = 30
# Options whose value may start with '-' (negative pixel coordinates).
_NUMERIC_LIST_OPTIONS = ("--points", "--boxes")
# Files of an earlier predict run that a new run replaces or removes.
PREDICT_OUTPUTS = r"predictions\.json|prompt\d+_by_(iou|area)\.png|masks/prompt\d+_level\d\.png"
AUTO_OUTPUTS = r"masks\.json|masks\.png"


class CliError(Exception):
  """A user error reported as ``error: ...`` with exit status 1."""


def _parse_groups(text: str, width: int, name: str) -> np.ndarray:
  example = "x,y;x,y" if width == 2 else "a,b,c,d;a,b,c,d"
  try:
    rows = [[float(v) for v in item.split(",")] for item in text.split(";") if item.strip()]
  except ValueError:
    raise CliError(f"cannot parse --{name} {text!r}: expected numbers like {example}") from None
  if not rows or any(len(r) != width for r in rows):
    raise CliError(f"--{name} needs groups of {width} numbers separated by ';' ({example})")
  arr = np.asarray(rows, np.float64)
  if not np.isfinite(arr).all():
    raise CliError(f"--{name} must hold finite numbers")
  return arr


def resize_short_side(image: np.ndarray, short_side: int,
                      max_long_side: int | None = DEFAULT_MAX_LONG_SIDE) -> np.ndarray:
  """Bicubic resize so the short side is ``short_side`` (0: unchanged), sized
  like torchvision's ``Resize(short_side, max_size=max_long_side)`` used by
  the original demos (the long side is capped; see
  :func:`semsam_jax.inference.io.processed_size`)."""
  return resize_image(image, short_side, max_long_side)


def _size_buckets(text: str):
  from semsam_jax.inference import SIZE_BUCKETS
  if text == "exact":
    return None
  if text == "default":
    return SIZE_BUCKETS
  try:
    b = tuple(int(v) for v in text.split(","))
  except ValueError:
    b = ()
  if not b or any(v <= 0 or v % 32 for v in b):
    raise CliError(f"--size-buckets must be 'exact', 'default' or comma-separated positive "
                   f"multiples of 32, got {text!r}")
  return b


def _check_model_args(args) -> None:
  if args.checkpoint and args.torch_checkpoint:
    raise CliError("give either --checkpoint or --torch-checkpoint, not both")
  if args.checkpoint:
    if args.reference_config:
      raise CliError("--reference-config goes with --torch-checkpoint, not --checkpoint")
    if not os.path.isdir(args.checkpoint):
      raise CliError(f"checkpoint directory not found: {args.checkpoint}")
    return
  if args.torch_checkpoint and args.reference_config:
    for path in (args.torch_checkpoint, args.reference_config):
      if not os.path.isfile(path):
        raise CliError(f"file not found: {path}")
    return
  if args.torch_checkpoint:
    raise CliError("--torch-checkpoint needs --reference-config X.yaml")
  if args.reference_config:
    raise CliError("--reference-config goes with --torch-checkpoint")
  from semsam_jax.assets import default_checkpoint
  try:
    args.checkpoint = default_checkpoint()
  except FileNotFoundError as e:
    raise CliError(f"no model given and {e}: give --checkpoint DIR, or --torch-checkpoint "
                   "X.pth with --reference-config X.yaml") from None


def _check_common(args) -> None:
  """Everything checkable without the image or the model."""
  from semsam_jax.inference.predictor import user_levels_to_tokens
  try:
    user_levels_to_tokens(args.levels)
  except ValueError as e:
    raise CliError(str(e)) from None
  if args.short_side < 0:
    raise CliError(f"--short-side must be >= 0 (0 keeps the input size), got {args.short_side}")
  if args.max_long_side < 0:
    raise CliError(f"--max-long-side must be >= 0 (0: no cap), got {args.max_long_side}")
  if args.max_pixels < 1:
    raise CliError(f"--max-pixels must be >= 1, got {args.max_pixels}")
  args.size_buckets_value = _size_buckets(args.size_buckets)
  _check_model_args(args)
  try:
    _cli.check_output_dir(args.output_dir)
  except ValueError as e:
    raise CliError(str(e)) from None


def _check_unit(args, *names) -> None:
  for name in names:
    v = getattr(args, name.replace("-", "_"))
    if not 0.0 <= v <= 1.0:
      raise CliError(f"--{name} must lie in [0, 1], got {v}")


def _load(args):
  """The input image and the size it will be processed at (no resize yet)."""
  try:
    image = load_image(args.image, max_pixels=args.max_pixels,
                       allow_large=args.allow_large_images)
  except ImageError as e:
    raise CliError(str(e)) from None
  h, w = image.shape[:2]
  ph, pw = processed_size(h, w, args.short_side, args.max_long_side)
  if ph * pw > args.max_pixels and not args.allow_large_images:
    raise CliError(f"the processed image would be {pw}x{ph} = {ph * pw:,} pixels, more than "
                   f"--max-pixels {args.max_pixels:,} (lower --short-side / --max-long-side, "
                   "or pass --allow-large-images)")
  return image, (ph, pw)


def _predictor(args):
  from semsam_jax.inference import SemanticSAMPredictor
  kw = dict(independent_prompts=getattr(args, "independent_prompts", False),
            size_buckets=args.size_buckets_value)
  if args.checkpoint:
    return SemanticSAMPredictor.from_checkpoint(args.checkpoint, **kw)
  return SemanticSAMPredictor.from_torch(args.torch_checkpoint, args.reference_config, **kw)


def _precision(args):
  import jax
  if args.precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(args.precision)


def _stages(names, enabled: bool):
  """A progress bar over named stages; call ``step(i)`` when stage i starts."""
  from tqdm.auto import tqdm
  bar = tqdm(total=len(names), disable=not enabled, unit="step", leave=False)

  def step(i):
    if i:
      bar.update(1)
    bar.set_description(names[i])

  return bar, step


def _r(x, digits: int) -> float:
  """A JSON number rounded to ``digits`` decimals (NaN/inf -> None)."""
  x = float(x)
  return round(x, digits) if math.isfinite(x) else None


def _rs(xs, digits: int) -> list:
  return [_r(v, digits) for v in xs]


def _save_json(obj, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, allow_nan=False)
    f.write("\n")


def _relative_prompts(args, points, boxes, ow: int, oh: int):
  """Validated prompts -> relative points (N, 2) / boxes cx,cy,w,h (M, 4)."""
  rel_points = rel_boxes = None
  if points is not None:
    if args.coords == "pixels":
      bad = (points[:, 0] < 0) | (points[:, 0] >= ow) | (points[:, 1] < 0) | (points[:, 1] >= oh)
      rel = points / [ow, oh]
    else:
      bad = (points < 0).any(1) | (points > 1).any(1)
      rel = points
    if bad.any():
      raise CliError(f"point(s) {points[bad].tolist()} lie outside the {ow}x{oh} image "
                     f"({args.coords} coordinates)")
    rel_points = rel
  if boxes is not None:
    b = boxes
    if args.coords == "pixels":
      bad = ((b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > ow) | (b[:, 3] > oh)
             | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))
      rel = np.stack([(b[:, 0] + b[:, 2]) / 2 / ow, (b[:, 1] + b[:, 3]) / 2 / oh,
                      (b[:, 2] - b[:, 0]) / ow, (b[:, 3] - b[:, 1]) / oh], 1)
    else:
      eps = 1e-6
      bad = ((b[:, 2] <= 0) | (b[:, 3] <= 0) | (b[:, 0] - b[:, 2] / 2 < -eps)
             | (b[:, 1] - b[:, 3] / 2 < -eps) | (b[:, 0] + b[:, 2] / 2 > 1 + eps)
             | (b[:, 1] + b[:, 3] / 2 > 1 + eps))
      rel = b
    if bad.any():
      raise CliError(f"box(es) {b[bad].tolist()} are empty or outside the {ow}x{oh} image "
                     f"({args.coords} coordinates)")
    rel_boxes = rel
  return rel_points, rel_boxes


def cmd_predict(args) -> None:
  from semsam_jax.inference.predictor import user_levels_to_tokens
  _check_common(args)
  _check_unit(args, "iou-thresh")
  points = _parse_groups(args.points, 2, "points") if args.points else None
  boxes = _parse_groups(args.boxes, 4, "boxes") if args.boxes else None
  if points is None and boxes is None:
    raise CliError("give --points and/or --boxes")
  tokens = user_levels_to_tokens(args.levels)
  original, (h, w) = _load(args)
  oh, ow = original.shape[:2]
  rel_points, rel_boxes = _relative_prompts(args, points, boxes, ow, oh)

  from semsam_jax.inference import postprocess as pp
  from semsam_jax.inference import visualize as vis
  bar, step = _stages(["load model", "embed image", "decode", "write outputs"], args.progress)
  with bar:
    step(0)
    predictor = _predictor(args)
    step(1)
    image = resize_image(original, args.short_side, args.max_long_side)
    assert image.shape[:2] == (h, w)
    with _precision(args):
      predictor.set_image(image)
      step(2)
      res = predictor.predict(points=rel_points, boxes=rel_boxes, levels=args.levels,
                              coords="relative")
    step(3)
    n_points = 0 if rel_points is None else len(rel_points)
    report = {"image": os.path.abspath(args.image), "input_size": [oh, ow],
              "processed_size": [h, w], "coordinates": "pixels of the processed image",
              "levels": list(args.levels), "tokens": list(tokens),
              "independent_prompts": predictor.independent_prompts,
              "iou_thresh": args.iou_thresh, "prompts": []}
    with _cli.StagedOutput(args.output_dir, stale=PREDICT_OUTPUTS) as tmp:
      if args.mask_pngs:
        os.makedirs(os.path.join(tmp, "masks"))
      for i in range(res.logits.shape[0]):
        if i < n_points:
          px, py = rel_points[i] * [w, h]
          prompt = {"point": _rs((px, py), 2)}
          clicks, drawn_boxes = [(px, py)], []
        else:
          cx, cy, bw, bh = rel_boxes[i - n_points]
          xyxy = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
          prompt = {"box": _rs(xyxy, 2)}
          clicks, drawn_boxes = [], [xyxy]
        kept, by_area = pp.select_multi_masks(res.logits[i], res.ious[i],
                                              iou_thresh=args.iou_thresh)
        kept_idx = {k.index for k in kept}
        masks = []
        for j, level in enumerate(res.levels):
          m = {"level": level, "token": res.tokens[j],
               "predicted_iou": _r(res.ious[i, j], 4), "area": int(res.masks[i, j].sum()),
               "box_xyxy": _rs(res.boxes[i, j], 2), "kept": j in kept_idx,
               "segmentation": pp.encode_rle(res.masks[i, j])}
          if args.mask_pngs:
            name = f"masks/prompt{i}_level{level}.png"
            vis.mask_image(res.masks[i, j]).save(os.path.join(tmp, name), format="PNG")
            m["png"] = name
          masks.append(m)
        prompt["masks"] = masks
        prompt["kept_by_iou"] = [res.levels[k.index] for k in kept]
        prompt["kept_by_area"] = [res.levels[k.index] for k in by_area]
        report["prompts"].append(prompt)

        def tiles(ks):
          return [vis.overlay(image, k.mask, text=f"L{res.levels[k.index]} {k.iou:.2f}",
                              points=clicks, boxes=drawn_boxes) for k in ks]

        for kind, ks in (("by_iou", kept), ("by_area", by_area)):
          if ks:  # no strip when no mask passes --iou-thresh
            vis.strip(tiles(ks)).save(os.path.join(tmp, f"prompt{i}_{kind}.png"), format="PNG")
          prompt[f"strip_{kind}"] = f"prompt{i}_{kind}.png" if ks else None
      _save_json(report, os.path.join(tmp, "predictions.json"))
    bar.update(1)
  print(f"{res.logits.shape[0]} prompt(s), {len(tokens)} level(s) each -> {args.output_dir}")


def cmd_auto(args) -> None:
  _check_common(args)
  for name in ("points-per-side", "points-per-batch"):
    if getattr(args, name.replace("-", "_")) < 1:
      raise CliError(f"--{name} must be >= 1, got {getattr(args, name.replace('-', '_'))}")
  for name in ("crop-n-layers", "min-mask-region-area"):
    if getattr(args, name.replace("-", "_")) < 0:
      raise CliError(f"--{name} must be >= 0, got {getattr(args, name.replace('-', '_'))}")
  _check_unit(args, "pred-iou-thresh", "stability-score-thresh", "box-nms-thresh")
  if not (math.isfinite(args.stability_score_offset) and args.stability_score_offset > 0):
    raise CliError(f"--stability-score-offset must be > 0, got {args.stability_score_offset}")
  original, (h, w) = _load(args)

  from semsam_jax.inference import SemanticSAMAutomaticMaskGenerator
  from semsam_jax.inference import postprocess as pp
  from semsam_jax.inference import visualize as vis
  predictor = _predictor(args)
  image = resize_image(original, args.short_side, args.max_long_side)
  gen = SemanticSAMAutomaticMaskGenerator(
      predictor, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
      pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
      stability_score_offset=args.stability_score_offset, box_nms_thresh=args.box_nms_thresh,
      crop_n_layers=args.crop_n_layers, min_mask_region_area=args.min_mask_region_area,
      levels=args.levels, output_mode="coco_rle", progress=args.progress)
  with _precision(args):
    records = gen.generate(image)
  masks = [pp.decode_rle(r["segmentation"]) for r in records]
  for r in records:
    r["bbox"] = _rs(r["bbox"], 2)
    r["predicted_iou"] = _r(r["predicted_iou"], 4)
    r["stability_score"] = _r(r["stability_score"], 4)
    r["point_coords"] = [_rs(p, 2) for p in r["point_coords"]]
    r["crop_box"] = _rs(r["crop_box"], 2)
  with _cli.StagedOutput(args.output_dir, stale=AUTO_OUTPUTS) as tmp:
    vis.color_masks(image, masks).save(os.path.join(tmp, "masks.png"), format="PNG")
    _save_json({"image": os.path.abspath(args.image), "input_size": list(original.shape[:2]),
                "processed_size": [h, w], "coordinates": "pixels of the processed image",
                "levels": list(args.levels), "annotations": records},
               os.path.join(tmp, "masks.json"))
  print(f"{len(records)} mask(s) -> {args.output_dir}")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the description's line breaks; option help says its own default."""


def build_parser() -> argparse.ArgumentParser:
  from semsam_jax import __version__
  ap = argparse.ArgumentParser(prog="python -m semsam_jax", description=__doc__,
                               formatter_class=_HelpFormatter)
  ap.add_argument("--version", action="version", version=f"semsam_jax {__version__}")
  sub = ap.add_subparsers(dest="command", required=True, metavar="{predict,auto}")

  def common(p):
    p.add_argument("--image", required=True, help="input image (any format PIL reads)")
    p.add_argument("--output-dir", required=True, metavar="DIR",
                   help="where the PNG/JSON outputs go (created at the end of a successful "
                        "run; earlier outputs of this command there are replaced)")
    m = p.add_argument_group(
        "model (--checkpoint DIR, or --torch-checkpoint PTH with --reference-config YAML; "
        "default: the committed tiny checkpoint, trained on the synthetic data)")
    m.add_argument("--checkpoint", metavar="DIR",
                   help="orbax checkpoint dir from `python -m semsam_jax.convert` or "
                        "train.py (WORKDIR/export); default: semsam_jax/assets/tiny")
    m.add_argument("--torch-checkpoint", metavar="PTH",
                   help="original Semantic-SAM .pth (converted on the fly)")
    m.add_argument("--reference-config", metavar="YAML",
                   help="the original YAML of --torch-checkpoint")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6], metavar="L",
                   help="granularity levels 1 (finest) .. 6 (coarsest) (default: all six)")
    p.add_argument("--short-side", type=int, default=640, metavar="N",
                   help="resize the image so its short side has N pixels, like the original "
                        "demos; 0 keeps the input size (default: %(default)s)")
    p.add_argument("--max-long-side", type=int, default=DEFAULT_MAX_LONG_SIDE, metavar="N",
                   help="cap of the processed long side (the short side shrinks to keep the "
                        "aspect ratio); 0: no cap (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse input images with more pixels, checked before decoding "
                        "(default: %(default)s)")
    p.add_argument("--allow-large-images", action="store_true",
                   help="read images of any size (lifts --max-pixels and PIL's "
                        "decompression-bomb check)")
    p.add_argument("--size-buckets", default="exact",
                   help="padded sizes: 'exact' (multiple of 32, bit-faithful), 'default' (a "
                        "preset bucket list) or e.g. '512,768,1024' (default: %(default)s)")
    p.add_argument("--precision", choices=("default", "high", "highest"), default="default",
                   help="jax matmul precision; highest: full float32 on GPUs/TPUs "
                        "(default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="do not show progress bars (shown by default)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not use the persistent compilation cache "
                        f"({_cli.compile_cache_dir()}; also SEMSAM_JAX_COMPILE_CACHE=0)")

  p = sub.add_parser(
      "predict", help="clicks/boxes -> masks of each granularity",
      formatter_class=argparse.HelpFormatter,
      description="Decode clicks and/or boxes into the masks of the chosen granularity levels. "
                  "Writes prompt<i>_by_iou.png / prompt<i>_by_area.png strips and "
                  "predictions.json (scores, boxes, COCO-RLE masks; coordinates in pixels of "
                  "the processed image).")
  common(p)
  p.add_argument("--points", metavar="X,Y;...",
                 help="clicks 'x,y;x,y' (see --coords); negative values may follow directly")
  p.add_argument("--boxes", metavar="BOX;...",
                 help="boxes 'x0,y0,x1,y1;...' in pixels, or 'cx,cy,w,h;...' with "
                      "--coords relative")
  p.add_argument("--coords", choices=("pixels", "relative"), default="pixels",
                 help="prompt coordinates: pixels of the input image or relative in [0, 1] "
                      "(default: %(default)s)")
  p.add_argument("--iou-thresh", type=float, default=0.5, metavar="T",
                 help="masks under this predicted IoU are left out of the strips, in [0, 1] "
                      "(default: %(default)s)")
  p.add_argument("--mask-pngs", action="store_true",
                 help="also write every mask as masks/prompt<i>_level<l>.png (0/255)")
  p.add_argument("--independent-prompts", action="store_true",
                 help="prompts of one call do not attend to each other (by default they do, "
                      "as in the original)")
  p.set_defaults(func=cmd_predict)

  p = sub.add_parser(
      "auto", help="automatic mask generation at chosen levels",
      formatter_class=argparse.HelpFormatter,
      description="Segment the whole image from a grid of clicks at the chosen granularity "
                  "levels. Writes masks.png (all masks coloured) and masks.json (SAM-style "
                  "records with COCO-RLE masks, coordinates in pixels of the processed image).")
  common(p)
  p.add_argument("--points-per-side", type=int, default=32, metavar="N",
                 help="an N x N grid of clicks over the image (default: %(default)s)")
  p.add_argument("--points-per-batch", type=int, default=200, metavar="N",
                 help="clicks decoded per call; they attend to each other as in the original "
                      "(default: %(default)s)")
  p.add_argument("--pred-iou-thresh", type=float, default=0.88, metavar="T",
                 help="keep masks whose predicted IoU is above T, in [0, 1] "
                      "(default: %(default)s)")
  p.add_argument("--stability-score-thresh", type=float, default=0.92, metavar="T",
                 help="keep masks whose stability score is at least T, in [0, 1] "
                      "(default: %(default)s)")
  p.add_argument("--stability-score-offset", type=float, default=1.0, metavar="V",
                 help="logit offset of the stability score (masks at +V vs -V), > 0 "
                      "(default: %(default)s)")
  p.add_argument("--box-nms-thresh", type=float, default=0.7, metavar="T",
                 help="box IoU above which the lower-scored of two masks is dropped, in [0, 1] "
                      "(default: %(default)s)")
  p.add_argument("--crop-n-layers", type=int, default=0, metavar="N",
                 help="extra SAM-style crop layers (layer i: (2**i)**2 crops, each embedded "
                      "separately); 0: the whole image only, as the original (default: "
                      "%(default)s)")
  p.add_argument("--min-mask-region-area", type=int, default=10, metavar="A",
                 help="fill holes / remove islands smaller than A pixels; 0: off "
                      "(default: %(default)s)")
  p.set_defaults(func=cmd_auto)
  return ap


_NUMBERS = re.compile(r"-[0-9.]")


def _join_negative_values(argv: list[str]) -> list[str]:
  """``--points -5,3`` -> ``--points=-5,3`` (argparse would take -5,3 for an option)."""
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a in _NUMERIC_LIST_OPTIONS and i + 1 < len(argv) and _NUMBERS.match(argv[i + 1]):
      out.append(f"{a}={argv[i + 1]}")
      i += 2
      continue
    out.append(a)
    i += 1
  return out


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(_join_negative_values([str(a) for a in argv]))
  try:
    _cli.enable_compile_cache(args.no_compile_cache)
    args.func(args)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return _cli.EXIT_INTERRUPTED
  except CliError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except MemoryError:
    print("error: out of memory (try a smaller --short-side or --max-long-side)",
          file=sys.stderr)
    return 1
  except (ValueError, RuntimeError, OSError, ImportError) as e:
    print(_cli.error_lines(str(e), MAX_ERROR_LINES), file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  _rc = main()
  if _rc:
    # After a reported error, leave without the interpreter's shutdown: a
    # failed orbax restore leaves coroutines and TensorStore callbacks behind
    # whose garbage collection would print pages of tracebacks.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_rc)
  sys.exit(_rc)
