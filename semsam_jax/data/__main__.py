"""``python -m semsam_jax.data {build-sa1b,build-coco,build-masks,synth,show}``.

All build commands write one TFDS dataset (SA-1B features, ArrayRecord files)
under ``--output DATA_DIR`` in the usual TFDS layout
(``DATA_DIR/segment_anything_local/1.0.0/``), readable without TensorFlow with
``tfds.builder_from_directory(...).as_data_source(split)``.  Damaged inputs are
reported (``skip FILE: reason``) and left out; the last line counts built and
skipped examples.  Running a build again resumes it (sources already built are
reused); new sources extend the dataset.  See docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import sys


def _log(msg):
  print(msg, file=sys.stderr, flush=True)


def _common(p):
  p.add_argument("--output", "-o", required=True, metavar="DATA_DIR",
                 help="data dir (the TFDS dataset goes under DATA_DIR/segment_anything_local/1.0.0)")
  p.add_argument("--split", default="train",
                 help="split to build these sources into (default: train); build other splits "
                      "(e.g. heldout) with further calls on the same DATA_DIR")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="processes that read and validate the input files (default: all cores)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
      prog="python -m semsam_jax.data", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="command", required=True)

  p = sub.add_parser("build-sa1b", help="SA-1B folders (sa_N.jpg + sa_N.json) -> TFDS dataset",
                     description="Build SA-1B-layout folders (one sa_N.jpg + sa_N.json per image, "
                                 "as Meta ships them; one folder per extracted tar) into one TFDS "
                                 "dataset. Each folder becomes one part of the split.")
  p.add_argument("sources", nargs="+", metavar="SOURCE_DIR")
  _common(p)

  p = sub.add_parser("build-coco", help="COCO instance JSON + image folder -> TFDS dataset",
                     description="Import a COCO instance-segmentation JSON (polygons, RLE, "
                                 "uncompressed RLE) and its image folder.")
  p.add_argument("annotations", metavar="ANNOTATIONS.json")
  p.add_argument("image_dir", metavar="IMAGE_DIR")
  p.add_argument("--crowd", choices=("skip", "keep"), default="skip",
                 help="iscrowd=1 annotations: skip (default, as the reference mapper) or keep "
                      "them as ordinary masks")
  _common(p)

  p = sub.add_parser("build-masks", help="image folder + mask PNGs -> TFDS dataset",
                     description="Import IMAGE_DIR/<stem>.{jpg,jpeg,png} with masks in MASK_DIR, "
                                 "either MASK_DIR/<stem>/*.png (one PNG per instance, nonzero = "
                                 "instance) or MASK_DIR/<stem>.png (one label PNG per image: each "
                                 "distinct nonzero value or colour is an instance).")
  p.add_argument("image_dir", metavar="IMAGE_DIR")
  p.add_argument("mask_dir", metavar="MASK_DIR")
  p.add_argument("--ignore-value", type=int, action="append", default=[],
                 help="label value that is not an instance (e.g. 255 for VOC-style borders); "
                      "repeatable")
  _common(p)

  p = sub.add_parser("synth", help="write a synthetic SA-1B-layout source folder",
                     description="Synthetic images of textured objects made of parts and "
                                 "sub-parts, grouped and occluding each other, with masks at "
                                 "every level (SA-1B layout; build it with build-sa1b). "
                                 "Deterministic in --seed.")
  p.add_argument("--num-images", type=int, required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", "-o", required=True, metavar="SOURCE_DIR")
  p.add_argument("--image-size", type=int, nargs="+", default=[256], metavar="N",
                 help="side of the square images, or HEIGHT WIDTH (default 256)")
  p.add_argument("--objects", type=int, nargs=2, default=[3, 6], metavar=("MIN", "MAX"),
                 help="objects per image (default 3 6: ~25-50 masks; 20 24: 73-147, mean 107, at 1500x2250)")
  p.add_argument("--max-parts", type=int, default=3, help="parts per object: 1..N (default 3)")
  p.add_argument("--object-radius", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                 help="object radius range / min(H, W) (default 0.06 0.16)")
  p.add_argument("--subpart-radius", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                 help="sub-part radius range / its object's radius (default 0.15 0.35)")
  p.add_argument("--subparts-per-part", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                 help="sub-parts per part, inclusive range (default 0 2)")
  p.add_argument("--detail-prob", type=float, default=None,
                 help="chance that a sub-part holds a detail (default 0.4)")
  p.add_argument("--min-area", type=int, default=None,
                 help="visible regions of fewer pixels are not annotated (default 4)")
  p.add_argument("--image-id-offset", type=int, default=0,
                 help="image ids (and file names sa_<id>) start at offset + 1")
  p.add_argument("--workers", type=int, default=1)
  p.add_argument("--no-progress", action="store_true")

  p = sub.add_parser("show", help="draw one example after augmentation",
                     description="Draw example --index of a split as the training pipeline "
                                 "makes it: the augmented image, every shipped mask with its "
                                 "box, and a few sampled clicks with their nested level targets.")
  p.add_argument("data_dir", metavar="DATA_DIR")
  p.add_argument("--index", type=int, default=0)
  p.add_argument("--output", "-o", required=True, metavar="PNG")
  p.add_argument("--split", default="train")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--epoch", type=int, default=0)
  p.add_argument("--image-size", type=int, default=1024, help="canvas side S (default 1024)")
  p.add_argument("--clicks", type=int, default=4, help="clicks to draw (default 4)")
  p.add_argument("--mask-pad-value", type=int, choices=(0, 255), default=255,
                 help="255 (reference): masks include the crop's pad region; 0: they do not")
  p.add_argument("--dpi", type=int, default=110, help="resolution of the PNG (default 110)")
  return ap


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  progress = not getattr(args, "no_progress", False)
  try:
    if args.command == "synth":
      from semsam_jax.data import synthetic
      size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size[:2])
      names = synthetic.generate(args.output, args.num_images, args.seed, size,
                                 objects_per_image=tuple(args.objects),
                                 max_parts=args.max_parts,
                                 image_id_offset=args.image_id_offset,
                                 num_workers=args.workers, progress=progress,
                                 object_radius=args.object_radius,
                                 subpart_radius=args.subpart_radius,
                                 subparts_per_part=args.subparts_per_part,
                                 detail_prob=args.detail_prob, min_area=args.min_area)
      print(f"wrote {len(names)} images to {args.output}")
      return 0
    if args.command == "show":
      from semsam_jax.data import show
      ex = show.show(args.data_dir, args.index, args.output, split=args.split, seed=args.seed,
                     epoch=args.epoch, image_size=args.image_size, num_clicks=args.clicks,
                     mask_pad_value=args.mask_pad_value, dpi=args.dpi)
      print(f"wrote {args.output} ({int(ex['mask_valid'].sum())} masks, "
            f"{int(ex['prompt_valid'].sum())} prompts)")
      return 0
    if args.command == "build-sa1b":
      from semsam_jax.data import sa1b
      report = sa1b.build(args.sources, args.output, split=args.split,
                          num_workers=args.workers, progress=progress, log=_log)
    elif args.command == "build-coco":
      from semsam_jax.data import importers
      report = importers.build_coco(args.annotations, args.image_dir, args.output,
                                    split=args.split, crowd=args.crowd,
                                    num_workers=args.workers, progress=progress, log=_log)
    else:
      from semsam_jax.data import importers
      report = importers.build_masks(args.image_dir, args.mask_dir, args.output,
                                     split=args.split, ignore_values=args.ignore_value,
                                     num_workers=args.workers, progress=progress, log=_log)
    print(f"{args.split}: {report.summary()} -> {os.path.join(args.output, 'segment_anything_local', '1.0.0')}")
    return 0
  except (FileNotFoundError, ValueError, KeyError, IndexError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
