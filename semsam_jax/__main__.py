"""Command line: ``python -m semsam_jax {predict,auto} ...``.

predict: clicks/boxes on an image -> the masks of the chosen granularity
  levels, as PNG strips (kept masks sorted by predicted IoU and by area, as the
  original demo shows them, the prompt drawn in red) and a JSON of scores and
  boxes.
auto:    whole-image mask generation at the chosen levels -> a coloured
  overlay PNG and a JSON of SAM-style records with COCO-RLE masks.

The model comes from an orbax checkpoint written by ``python -m
semsam_jax.convert`` (--checkpoint) or from an original .pth + YAML
(--torch-checkpoint/--reference-config, converted on the fly).

Like the original demos, the image is first resized (bicubic) so that its
short side is --short-side pixels (640 by default; 0 keeps the input size).
Pixel prompts refer to the input image; every output (masks, boxes, point
coordinates) refers to the processed image, whose size is in the JSON.
Levels are the user granularity levels 1 (finest) .. 6 (coarsest).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

import numpy as np

MAX_ERROR_LINES = 30


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


def _load_image(path: str) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise CliError(f"image not found: {path}") from None
  except (UnidentifiedImageError, OSError) as e:
    raise CliError(f"cannot read image {path}: {e}") from None


def resize_short_side(image: np.ndarray, short_side: int) -> np.ndarray:
  """Bicubic resize so the short side is ``short_side`` (0: unchanged), sized
  like torchvision's ``Resize(short_side)`` used by the original demos."""
  if short_side <= 0:
    return image
  from PIL import Image
  h, w = image.shape[:2]
  if min(h, w) == short_side:
    return image
  if h <= w:
    nh, nw = short_side, int(short_side * w / h)
  else:
    nh, nw = int(short_side * h / w), short_side
  return np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))


def _predictor(args):
  from semsam_jax.inference import SIZE_BUCKETS, SemanticSAMPredictor
  kw = dict(independent_prompts=getattr(args, "independent_prompts", False))
  if args.size_buckets == "exact":
    kw["size_buckets"] = None
  elif args.size_buckets == "default":
    kw["size_buckets"] = SIZE_BUCKETS
  else:
    try:
      kw["size_buckets"] = tuple(int(v) for v in args.size_buckets.split(","))
    except ValueError:
      raise CliError(f"--size-buckets must be 'exact', 'default' or comma-separated "
                     f"integers, got {args.size_buckets!r}") from None
  if args.checkpoint and args.torch_checkpoint:
    raise CliError("give either --checkpoint or --torch-checkpoint, not both")
  if args.checkpoint:
    if not os.path.isdir(args.checkpoint):
      raise CliError(f"checkpoint directory not found: {args.checkpoint}")
    return SemanticSAMPredictor.from_checkpoint(args.checkpoint, **kw)
  if args.torch_checkpoint and args.reference_config:
    for path in (args.torch_checkpoint, args.reference_config):
      if not os.path.isfile(path):
        raise CliError(f"file not found: {path}")
    return SemanticSAMPredictor.from_torch(args.torch_checkpoint, args.reference_config, **kw)
  raise CliError("give --checkpoint DIR, or --torch-checkpoint X.pth with "
                 "--reference-config X.yaml")


def _atomic_write(path: str, write) -> None:
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
  os.close(fd)
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _save_png(img, path: str) -> None:
  _atomic_write(path, lambda p: img.save(p, format="PNG"))


def _save_json(obj, path: str) -> None:
  def write(p):
    with open(p, "w") as f:
      json.dump(obj, f, indent=1)
  _atomic_write(path, write)


def _precision(args):
  import jax
  if args.precision == "default":
    return contextlib.nullcontext()
  return jax.default_matmul_precision(args.precision)


def _prepare_output_dir(path: str) -> None:
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise CliError(f"cannot create output directory {path}: {e}") from None


def _stages(names, enabled: bool):
  """A progress bar over named stages; call ``step(i)`` when stage i starts."""
  from tqdm.auto import tqdm
  bar = tqdm(total=len(names), disable=not enabled, unit="step", leave=False)

  def step(i):
    if i:
      bar.update(1)
    bar.set_description(names[i])

  return bar, step


def cmd_predict(args) -> None:
  from semsam_jax.inference import postprocess as pp
  from semsam_jax.inference import visualize as vis
  from semsam_jax.inference.predictor import user_levels_to_tokens
  tokens = user_levels_to_tokens(args.levels)
  points = _parse_groups(args.points, 2, "points") if args.points else None
  boxes = _parse_groups(args.boxes, 4, "boxes") if args.boxes else None
  if points is None and boxes is None:
    raise CliError("give --points and/or --boxes")
  original = _load_image(args.image)
  oh, ow = original.shape[:2]
  # Prompts -> relative coordinates (independent of the resize).
  rel_points = rel_boxes = None
  if points is not None:
    if args.coords == "pixels":
      bad = (points[:, 0] < 0) | (points[:, 0] >= ow) | (points[:, 1] < 0) | (points[:, 1] >= oh)
      if bad.any():
        raise CliError(f"point(s) {points[bad].tolist()} lie outside the {ow}x{oh} image")
      rel_points = points / [ow, oh]
    else:
      rel_points = points
  if boxes is not None:
    if args.coords == "pixels":
      b = boxes
      bad = ((b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > ow) | (b[:, 3] > oh)
             | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))
      if bad.any():
        raise CliError(f"box(es) {b[bad].tolist()} are empty or outside the {ow}x{oh} image")
      rel_boxes = np.stack([(b[:, 0] + b[:, 2]) / 2 / ow, (b[:, 1] + b[:, 3]) / 2 / oh,
                            (b[:, 2] - b[:, 0]) / ow, (b[:, 3] - b[:, 1]) / oh], 1)
    else:
      rel_boxes = boxes
  _prepare_output_dir(args.output_dir)

  bar, step = _stages(["load model", "embed image", "decode", "write outputs"], args.progress)
  with bar:
    step(0)
    predictor = _predictor(args)
    step(1)
    image = resize_short_side(original, args.short_side)
    h, w = image.shape[:2]
    with _precision(args):
      predictor.set_image(image)
      step(2)
      res = predictor.predict(points=rel_points, boxes=rel_boxes, levels=tokens,
                              coords="relative")
    step(3)
    level_of = {t: l for l, t in zip(args.levels, tokens)}
    n_points = 0 if rel_points is None else len(rel_points)
    report = {"image": os.path.abspath(args.image), "input_size": [oh, ow],
              "processed_size": [h, w], "levels": list(args.levels), "tokens": list(tokens),
              "independent_prompts": predictor.independent_prompts,
              "iou_thresh": args.iou_thresh, "prompts": []}
    for i in range(res.logits.shape[0]):
      if i < n_points:
        px, py = rel_points[i] * [w, h]
        prompt = {"point": [float(px), float(py)]}
        clicks, drawn_boxes = [(px, py)], []
      else:
        cx, cy, bw, bh = rel_boxes[i - n_points]
        xyxy = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        prompt = {"box": [float(v) for v in xyxy]}
        clicks, drawn_boxes = [], [xyxy]
      kept, by_area = pp.select_multi_masks(res.logits[i], res.ious[i],
                                            iou_thresh=args.iou_thresh)
      kept_idx = {k.index for k in kept}
      prompt["masks"] = [{
          "level": level_of[tokens[j]], "token": int(tokens[j]),
          "predicted_iou": float(res.ious[i, j]), "area": int(res.masks[i, j].sum()),
          "box_xyxy": [float(v) for v in res.boxes[i, j]],
          "kept": j in kept_idx} for j in range(len(tokens))]
      prompt["kept_by_iou"] = [level_of[tokens[k.index]] for k in kept]
      prompt["kept_by_area"] = [level_of[tokens[k.index]] for k in by_area]
      report["prompts"].append(prompt)

      def tiles(ks):
        return [vis.overlay(image, k.mask, text=f"L{level_of[tokens[k.index]]} {k.iou:.2f}",
                            points=clicks, boxes=drawn_boxes) for k in ks]

      _save_png(vis.strip(tiles(kept)), os.path.join(args.output_dir, f"prompt{i}_by_iou.png"))
      _save_png(vis.strip(tiles(by_area)),
                os.path.join(args.output_dir, f"prompt{i}_by_area.png"))
    _save_json(report, os.path.join(args.output_dir, "predictions.json"))
    bar.update(1)
  print(f"{res.logits.shape[0]} prompt(s), {len(tokens)} level(s) each -> {args.output_dir}")


def cmd_auto(args) -> None:
  from semsam_jax.inference import SemanticSAMAutomaticMaskGenerator
  from semsam_jax.inference import postprocess as pp
  from semsam_jax.inference import visualize as vis
  from semsam_jax.inference.predictor import user_levels_to_tokens
  user_levels_to_tokens(args.levels)  # validate before the slow parts
  original = _load_image(args.image)
  _prepare_output_dir(args.output_dir)
  predictor = _predictor(args)
  image = resize_short_side(original, args.short_side)
  gen = SemanticSAMAutomaticMaskGenerator(
      predictor, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
      pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
      stability_score_offset=args.stability_score_offset, box_nms_thresh=args.box_nms_thresh,
      crop_n_layers=args.crop_n_layers, min_mask_region_area=args.min_mask_region_area,
      levels=args.levels, output_mode="coco_rle", progress=args.progress)
  with _precision(args):
    records = gen.generate(image)
  masks = [pp.decode_rle(r["segmentation"]) for r in records]
  _save_png(vis.color_masks(image, masks), os.path.join(args.output_dir, "masks.png"))
  h, w = image.shape[:2]
  _save_json({"image": os.path.abspath(args.image), "input_size": list(original.shape[:2]),
              "processed_size": [h, w], "levels": list(args.levels), "annotations": records},
             os.path.join(args.output_dir, "masks.json"))
  print(f"{len(records)} mask(s) -> {args.output_dir}")


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m semsam_jax", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True)

  def common(p):
    p.add_argument("--image", required=True, help="input image (any format PIL reads)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="orbax checkpoint dir from `python -m semsam_jax.convert`")
    p.add_argument("--torch-checkpoint", metavar="PTH",
                   help="original Semantic-SAM .pth (converted on the fly)")
    p.add_argument("--reference-config", metavar="YAML",
                   help="the original YAML of --torch-checkpoint")
    p.add_argument("--output-dir", required=True, help="where the PNG/JSON outputs go")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6],
                   help="granularity levels 1 (finest) .. 6 (coarsest); default: all")
    p.add_argument("--short-side", type=int, default=640,
                   help="resize the image so its short side has this many pixels, like "
                        "the original demos (default 640; 0 keeps the input size)")
    p.add_argument("--size-buckets", default="exact",
                   help="padded sizes: 'exact' (multiple of 32, bit-faithful; default), "
                        "'default' (a preset bucket list) or e.g. '512,768,1024'")
    p.add_argument("--precision", choices=("default", "high", "highest"), default="default",
                   help="jax matmul precision (highest: full float32 on GPUs/TPUs)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide progress bars")

  p = sub.add_parser("predict", help="clicks/boxes -> masks of each granularity",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common(p)
  p.add_argument("--points", help="clicks 'x,y;x,y' (see --coords)")
  p.add_argument("--boxes", help="boxes 'x0,y0,x1,y1;...' in pixels, or 'cx,cy,w,h;...' "
                 "with --coords relative")
  p.add_argument("--coords", choices=("pixels", "relative"), default="pixels",
                 help="prompt coordinates: pixels of the input image or relative in [0, 1]")
  p.add_argument("--iou-thresh", type=float, default=0.5,
                 help="masks under this predicted IoU are left out of the strips")
  p.add_argument("--independent-prompts", action="store_true",
                 help="prompts of one call do not attend to each other (default: they do, "
                      "as in the original)")
  p.set_defaults(func=cmd_predict)

  p = sub.add_parser("auto", help="automatic mask generation at chosen levels",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  common(p)
  p.add_argument("--points-per-side", type=int, default=32)
  p.add_argument("--points-per-batch", type=int, default=200)
  p.add_argument("--pred-iou-thresh", type=float, default=0.88)
  p.add_argument("--stability-score-thresh", type=float, default=0.92)
  p.add_argument("--stability-score-offset", type=float, default=1.0)
  p.add_argument("--box-nms-thresh", type=float, default=0.7)
  p.add_argument("--crop-n-layers", type=int, default=0)
  p.add_argument("--min-mask-region-area", type=int, default=10)
  p.set_defaults(func=cmd_auto)
  return ap


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  except CliError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (ValueError, RuntimeError, OSError, ImportError) as e:
    lines = f"error: {e}".splitlines()
    if len(lines) > MAX_ERROR_LINES:
      lines = lines[:MAX_ERROR_LINES] + [f"  ... ({len(lines) - MAX_ERROR_LINES} more lines)"]
    print("\n".join(lines), file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
