"""Throughput of the training input pipeline (decode + augment + click sampling).

    python benchmarks/data.py [--image-size 1024] [--source-size 1500 2250]
                              [--objects 20 24] [--num-images 24] [--workers 0 1 2]
                              [--batches 24] [--data-dir DIR] [--small]

Writes ``--num-images`` synthetic SA-1B-layout images of ``--source-size``
(HEIGHT WIDTH; SA-1B's images are about 1500 x 2250) with ``--objects``
objects each (SA-1B-like annotation counts, ~100 masks), builds them with the
SA-1B builder (cached under ``--data-dir``), then times the grain loader of
``semsam_jax.data.make_train_loader`` at canvas ``--image-size`` with the
reference settings (K = 60 prompts, T = 6 targets, M = 256 slots, scale
0.99-1.01, horizontal flip, mask pad 255), per-host batch 1, for each
``--workers`` count (0 = in the main process; n > 0 = n grain worker
processes, the main process only collects batches).

Columns: grain workers, CPU cores doing the work (max(workers, 1)),
images/s, source masks/s (images/s x the mean mask count of the timed
images), images/s per core, slots used and prompts dropped per image
(``max_masks_per_image``), and the 1-minute load average of the machine
before / after the row (other processes share the cores: a load above the
core count means the numbers are lower bounds).  The first
``--warmup`` batches of each row (worker start-up) are not timed.
The "in-process breakdown" lines time the stages of one example without grain.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402


def _dataset(args) -> str:
  from semsam_jax.data import sa1b, synthetic
  key = hashlib.sha1(repr((args.source_size, args.objects, args.num_images, 1)).encode()
                     ).hexdigest()[:10]
  root = os.path.join(args.data_dir, f"bench-{key}")
  data = os.path.join(root, "data")
  if not os.path.exists(os.path.join(root, "COMPLETE")):
    src = os.path.join(root, "src")
    synthetic.generate(src, args.num_images, seed=0, image_size=tuple(args.source_size),
                       objects_per_image=tuple(args.objects), num_workers=max(args.build_workers, 1),
                       progress=False)
    sa1b.build([src], data, num_workers=args.build_workers, progress=False, log=lambda m: None)
    open(os.path.join(root, "COMPLETE"), "w").close()
  return data


def _config(data_dir, args, workers):
  import ml_collections
  from semsam_jax.data import data_config
  d = data_config()
  d.update(dict(data_dir=data_dir, image_size=args.image_size, worker_count=workers))
  return ml_collections.ConfigDict(dict(seed=0, batch_size=1, data=d,
                                        model=dict(decoder=dict(num_mask_tokens=6))))


def _mask_counts(data_dir):
  from semsam_jax.data.pipeline import raw_source
  src = raw_source(data_dir, "train")
  return np.array([len(src[i]["annotations"]["id"]) for i in range(len(src))])


def run_row(data_dir, args, workers, counts):
  from semsam_jax.data import make_train_loader
  load0 = os.getloadavg()[0]
  it = iter(make_train_loader(_config(data_dir, args, workers), process_index=0,
                              process_count=1))
  for _ in range(args.warmup):
    next(it)
  ids, slots, dropped = [], [], []
  t0 = time.perf_counter()
  for _ in range(args.batches):
    b = next(it)
    ids.append(int(b["example_id"][0]))
    slots.append(int(b["mask_valid"].sum()))
    dropped.append(int(b["num_dropped_prompts"].sum()))
  dt = time.perf_counter() - t0
  del it
  ips = args.batches / dt
  cores = max(workers, 1)
  return dict(workers=workers, cores=cores, ips=ips, mps=ips * counts[ids].mean(),
              per_core=ips / cores, slots=np.mean(slots), dropped=np.mean(dropped),
              load=(load0, os.getloadavg()[0]))


def breakdown(data_dir, args):
  """Median seconds of each stage of one example, in this process."""
  from semsam_jax.data import pipeline as P
  from semsam_jax.data import transforms as T
  src = P.raw_source(data_dir, "train")
  opt = P.ExampleOptions.from_config(_config(data_dir, args, 0))
  times = {k: [] for k in ("read", "decode JPEG", "image flip+resize+crop", "RLE -> pieces",
                           "whole example (augment + sampling + packing)")}
  n = min(len(src), 8)
  for i in range(n):
    t = time.perf_counter()
    ex = src[i]
    times["read"].append(time.perf_counter() - t)
    t = time.perf_counter()
    img = T.decode_image(ex["image"]["content"])
    times["decode JPEG"].append(time.perf_counter() - t)
    rng = np.random.default_rng([0, i, 0])
    g = T.draw_geometry(rng, *img.shape[:2], opt.image_size, opt.min_scale, opt.max_scale)
    t = time.perf_counter()
    T.transform_image(img, g)
    times["image flip+resize+crop"].append(time.perf_counter() - t)
    t = time.perf_counter()
    T.mask_pieces(P._rles(ex), g)
    times["RLE -> pieces"].append(time.perf_counter() - t)
    t = time.perf_counter()
    P.prepare_example(img, P._rles(ex), np.random.default_rng([0, i, 0]), opt)
    times["whole example (augment + sampling + packing)"].append(time.perf_counter() - t)
  return {k: float(np.median(v)) for k, v in times.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--image-size", type=int, default=1024)
  ap.add_argument("--source-size", type=int, nargs=2, default=[1500, 2250],
                  metavar=("HEIGHT", "WIDTH"))
  ap.add_argument("--objects", type=int, nargs=2, default=[20, 24], metavar=("MIN", "MAX"))
  ap.add_argument("--num-images", type=int, default=24)
  ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--batches", type=int, default=24, help="timed images per row")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--build-workers", type=int, default=1)
  ap.add_argument("--data-dir", default=os.path.join(
      os.environ.get("TMPDIR", "/tmp"), "semsam_data_bench"))
  ap.add_argument("--small", action="store_true",
                  help="tiny shapes (smoke test): 64px canvas, 3 images of 96x128")
  args = ap.parse_args(argv)
  if args.small:
    args.image_size, args.source_size, args.objects = 64, [96, 128], [2, 3]
    args.num_images, args.batches, args.warmup = 3, 4, 1
    args.workers = [w for w in args.workers if w == 0] or [0]
  t = time.perf_counter()
  data_dir = _dataset(args)
  counts = _mask_counts(data_dir)
  print(f"dataset: {len(counts)} images of {args.source_size[0]}x{args.source_size[1]}, "
        f"masks per image mean {counts.mean():.1f} (min {counts.min()}, max {counts.max()}); "
        f"canvas {args.image_size}^2; {os.cpu_count()} CPU cores; "
        f"ready in {time.perf_counter() - t:.1f} s")
  print("in-process breakdown (median s per image): " + ", ".join(
      f"{k} {v:.4f}" for k, v in breakdown(data_dir, args).items()))
  print()
  print("| workers | cores | images/s | masks/s | images/s per core | slots used | "
        "prompts dropped | load 1 min before / after |")
  print("|---|---|---|---|---|---|---|---|")
  for w in args.workers:
    r = run_row(data_dir, args, w, counts)
    print(f"| {r['workers']} | {r['cores']} | {r['ips']:.2f} | {r['mps']:.0f} | "
          f"{r['per_core']:.2f} | {r['slots']:.1f} | {r['dropped']:.2f} | "
          f"{r['load'][0]:.1f} / {r['load'][1]:.1f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
