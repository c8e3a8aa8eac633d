"""Command line: ``python -m semsam_jax {predict,auto} ...``.

predict: clicks/boxes on an image -> masks of every granularity as PNG strips
  (sorted by predicted IoU and by area) and a JSON of scores and boxes.
auto:    whole-image mask generation at chosen levels -> coloured overlay PNG
  and a COCO-RLE JSON.
The model comes from an orbax checkpoint written by ``python -m
semsam_jax.convert`` (--checkpoint) or from an original .pth + YAML
(--torch-checkpoint/--reference-config, converted on the fly).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np


def _parse_pairs(text: str, width: int, name: str) -> np.ndarray:
  try:
    rows = [[float(v) for v in item.split(",")] for item in text.split(";") if item.strip()]
  except ValueError:
    raise SystemExit(f"error: cannot parse --{name} {text!r}: expected numbers like "
                     f"{'x,y;x,y' if width == 2 else 'a,b,c,d;a,b,c,d'}") from None
  if not rows or any(len(r) != width for r in rows):
    raise SystemExit(f"error: --{name} needs groups of {width} numbers separated by ';'")
  return np.asarray(rows, np.float64)


def _load_image(path: str) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise SystemExit(f"error: image not found: {path}") from None
  except (UnidentifiedImageError, OSError) as e:
    raise SystemExit(f"error: cannot read image {path}: {e}") from None


def _predictor(args):
  from semsam_jax.inference import SemanticSAMPredictor
  if args.checkpoint:
    return SemanticSAMPredictor.from_checkpoint(args.checkpoint)
  if args.torch_checkpoint and args.reference_config:
    return SemanticSAMPredictor.from_torch(args.torch_checkpoint, args.reference_config)
  raise SystemExit("error: give --checkpoint DIR, or --torch-checkpoint X.pth with "
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


def _save_png(img, path):
  _atomic_write(path, lambda p: img.save(p, format="PNG"))


def _save_json(obj, path):
  def write(p):
    with open(p, "w") as f:
      json.dump(obj, f, indent=1)
  _atomic_write(path, write)


def cmd_predict(args) -> None:
  from semsam_jax.inference import postprocess as pp
  from semsam_jax.inference import visualize as vis
  from semsam_jax.inference.predictor import user_levels_to_tokens
  image = _load_image(args.image)
  points = _parse_pairs(args.points, 2, "points") if args.points else None
  boxes = _parse_pairs(args.boxes, 4, "boxes") if args.boxes else None
  if points is None and boxes is None:
    raise SystemExit("error: give --points and/or --boxes")
  predictor = _predictor(args)
  predictor.set_image(image)
  tokens = user_levels_to_tokens(args.levels)
  res = predictor.predict(points=points, boxes=boxes, levels=tokens, coords=args.coords)
  os.makedirs(args.output_dir, exist_ok=True)
  h, w = image.shape[:2]
  n_points = 0 if points is None else len(points)
  report = {"image": args.image, "prompts": []}
  for i in range(res.logits.shape[0]):
    if i < n_points:
      p = points[i] * ([w, h] if args.coords == "relative" else [1, 1])
      prompt = {"point": [float(p[0]), float(p[1])]}
      clicks = [p]
    else:
      prompt = {"box": [float(v) for v in boxes[i - n_points]]}
      clicks = []
    kept, by_area = pp.select_multi_masks(res.logits[i], res.ious[i], iou_thresh=args.iou_thresh)
    level_of = {t: l for l, t in zip(args.levels, tokens)}
    prompt["masks"] = [{
        "level": level_of[tokens[j]], "token": int(tokens[j]),
        "predicted_iou": float(res.ious[i, j]), "area": int(res.masks[i, j].sum()),
        "box_xyxy": [float(v) for v in res.boxes[i, j]],
        "kept": any(k.index == j for k in kept)} for j in range(len(tokens))]
    report["prompts"].append(prompt)
    tiles = lambda ks: [vis.overlay(image, k.mask, text=f"L{level_of[tokens[k.index]]} "
                                    f"{k.iou:.2f}", points=clicks) for k in ks]
    _save_png(vis.strip(tiles(kept)), os.path.join(args.output_dir, f"prompt{i}_by_iou.png"))
    _save_png(vis.strip(tiles(by_area)), os.path.join(args.output_dir, f"prompt{i}_by_area.png"))
  _save_json(report, os.path.join(args.output_dir, "predictions.json"))
  print(f"{res.logits.shape[0]} prompt(s), {len(tokens)} level(s) each -> {args.output_dir}")


def cmd_auto(args) -> None:
  from semsam_jax.inference import SemanticSAMAutomaticMaskGenerator
  from semsam_jax.inference import visualize as vis
  image = _load_image(args.image)
  predictor = _predictor(args)
  gen = SemanticSAMAutomaticMaskGenerator(
      predictor, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
      pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
      box_nms_thresh=args.box_nms_thresh, min_mask_region_area=args.min_mask_region_area,
      levels=args.levels, output_mode="coco_rle")
  records = gen.generate(image)
  from semsam_jax.inference import postprocess as pp
  os.makedirs(args.output_dir, exist_ok=True)
  masks = [pp.decode_rle(r["segmentation"]) for r in records]
  _save_png(vis.color_masks(image, masks), os.path.join(args.output_dir, "masks.png"))
  _save_json({"image": args.image, "annotations": records},
             os.path.join(args.output_dir, "masks.json"))
  print(f"{len(records)} mask(s) -> {args.output_dir}")


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m semsam_jax", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True)

  def common(p):
    p.add_argument("--image", required=True, help="input image (any format PIL reads)")
    p.add_argument("--checkpoint", help="orbax checkpoint dir from `python -m semsam_jax.convert`")
    p.add_argument("--torch-checkpoint", help="original Semantic-SAM .pth (converted on the fly)")
    p.add_argument("--reference-config", help="the original YAML of --torch-checkpoint")
    p.add_argument("--output-dir", required=True, help="where PNG/JSON outputs go")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6],
                   help="granularity levels 1 (finest) .. 6 (default: all)")

  p = sub.add_parser("predict", help="clicks/boxes -> masks of each granularity")
  common(p)
  p.add_argument("--points", help="clicks 'x,y;x,y' (see --coords)")
  p.add_argument("--boxes", help="boxes 'x0,y0,x1,y1;...' in pixels, or 'cx,cy,w,h;...' "
                 "with --coords relative")
  p.add_argument("--coords", choices=("pixels", "relative"), default="pixels")
  p.add_argument("--iou-thresh", type=float, default=0.5,
                 help="masks under this predicted IoU are left out of the strips")
  p.set_defaults(func=cmd_predict)

  p = sub.add_parser("auto", help="automatic mask generation at chosen levels")
  common(p)
  p.add_argument("--points-per-side", type=int, default=32)
  p.add_argument("--points-per-batch", type=int, default=200)
  p.add_argument("--pred-iou-thresh", type=float, default=0.88)
  p.add_argument("--stability-score-thresh", type=float, default=0.92)
  p.add_argument("--box-nms-thresh", type=float, default=0.7)
  p.add_argument("--min-mask-region-area", type=int, default=10)
  p.set_defaults(func=cmd_auto)
  return ap


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    args.func(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
