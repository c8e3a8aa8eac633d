#!/usr/bin/env python
"""Evaluates a Semantic-SAM checkpoint with the original's protocols.

    python eval.py --config configs/semsam_swint.py --checkpoint ckpt/swint \\
        --dataset coco/annotations/instances_val2017.json --image-dir coco/val2017 \\
        --output out/eval

Protocols (``--protocol``): ``coco_interactive`` (the original's
``evaluate_interactive``: one centre click per ground-truth mask, 1-IoU Max and
Oracle, NoC@{0.5,0.8,0.85,0.9}, per COCO area range), ``multi_granularity``
(the SA-1B multi-granularity protocol as defined in docs/differences.md) or
``all`` (default).

``--dataset`` is a COCO instance JSON file, a folder with ``annotations.json``
(images in ``images/`` or the folder itself), or a dataset folder built by
``semsam_jax.data`` (``--split``).  Results: a table on stdout and in
``OUTPUT/metrics.md``, every metric in ``OUTPUT/metrics.json``, per-instance
IoUs and clicks in ``OUTPUT/instances.json``.  See docs/evaluation.md.

Multi-process (one process per host, docs/reliability.md): with
``JAX_COORDINATOR_ADDRESS`` (and ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``) set,
or with ``--distributed`` (cluster auto-detection), every process joins JAX's
runtime, evaluates every P-th image (positions p, p + P, ... of the dataset
order) on its local devices, the per-image results are gathered, and process 0
alone writes and prints the report -- the same numbers as one process.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent


class EvalError(Exception):
  """A user error, reported as ``error: ...`` with exit status 1."""


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="eval.py", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", help="a configs/*.py file (its get_config() .model section is "
                  "the architecture when converting a .pth without --reference-config)")
  ap.add_argument("--checkpoint", metavar="DIR", help="orbax checkpoint directory "
                  "(python -m semsam_jax.convert, or train.py's WORKDIR/export). Default, "
                  "without --torch-checkpoint: the committed tiny checkpoint "
                  "(semsam_jax/assets/tiny, configs/tiny.py trained on the synthetic data)")
  ap.add_argument("--torch-checkpoint", metavar="PTH",
                  help="original Semantic-SAM .pth (converted on the fly)")
  ap.add_argument("--reference-config", metavar="YAML", help="the original YAML of the .pth")
  ap.add_argument("--dataset", required=True, help="COCO JSON, folder with annotations.json, "
                  "or a semsam_jax.data dataset folder")
  ap.add_argument("--image-dir", help="COCO images (default: images/ beside the JSON, or its folder)")
  ap.add_argument("--split", default=None,
                  help="split of a semsam_jax.data dataset (default: the config's "
                       "data.eval_split, else 'heldout', the synthetic held-out split)")
  ap.add_argument("--output", required=True, help="output folder")
  ap.add_argument("--protocol", choices=("coco_interactive", "multi_granularity", "all"),
                  default="all")
  ap.add_argument("--num-images", type=int, help="evaluate only the first N usable images")
  ap.add_argument("--batch-size", type=int, default=1,
                  help="images per step (images of one padded size; rounded up to the "
                       "device count)")
  ap.add_argument("--click", choices=("kornia", "euclidean"), default="kornia",
                  help="click at the max of kornia's approximate distance transform (the "
                       "original) or of the exact Euclidean one")
  ap.add_argument("--min-size", type=int, help="test resize: short side (detectron2 "
                  "ResizeShortestEdge; 0 = none). Default: 800 for COCO, 0 otherwise")
  ap.add_argument("--max-size", type=int, help="test resize: longest side cap "
                  "(default 1333 for COCO, 0 otherwise)")
  ap.add_argument("--mg-max-clicks", type=int, default=60,
                  help="multi-granularity: clicks per image (sampled masks)")
  ap.add_argument("--seed", type=int, default=0, help="multi-granularity sampling seed")
  ap.add_argument("--precision", choices=("default", "high", "highest"), default="default",
                  help="jax matmul precision")
  ap.add_argument("--max-instances", type=int, default=1024,
                  help="skip (and report) images with more usable annotations than this: "
                       "their prompts are scored in one step, whose memory grows with the "
                       "square of the prompt count")
  ap.add_argument("--distributed", action="store_true",
                  help="call jax.distributed.initialize() with cluster auto-detection (TPU "
                       "pod slices, SLURM) even without JAX_COORDINATOR_ADDRESS")
  ap.add_argument("--no-progress", dest="progress", action="store_false")
  return ap


def _load_config_file(path: str):
  from semsam_jax.config import load_config_file
  try:
    return load_config_file(path)
  except (FileNotFoundError, ValueError) as e:
    raise EvalError(str(e)) from None


def _default_split(cfg) -> str:
  """``config.data.eval_split`` of the ``--config`` file when it has a data section."""
  if cfg is not None:
    data = cfg.get("data") if hasattr(cfg, "get") else None
    if data is not None and data.get("eval_split"):
      return str(data.eval_split)
  return "heldout"


def load_model(args, config=None):
  """(model config, params) from the checkpoint flags; ``config``: the loaded
  ``--config`` file (its model section converts a .pth without a YAML)."""
  from semsam_jax import evaluation
  if args.checkpoint and args.torch_checkpoint:
    raise EvalError("give either --checkpoint or --torch-checkpoint, not both")
  checkpoint = args.checkpoint
  if not checkpoint and not args.torch_checkpoint:
    checkpoint = str(evaluation.DEFAULT_CHECKPOINT)
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
      raise EvalError(f"no model given and the committed tiny checkpoint is missing "
                      f"({checkpoint}): pass --checkpoint DIR, or --torch-checkpoint X.pth "
                      "with --reference-config X.yaml")
    args.checkpoint = checkpoint
  if checkpoint:
    if not os.path.isdir(checkpoint):
      raise EvalError(f"checkpoint directory not found: {checkpoint}")
    from semsam_jax.convert.checkpoint import load_checkpoint
    return load_checkpoint(checkpoint)
  for path in (args.torch_checkpoint, args.reference_config):
    if path and not os.path.isfile(path):
      raise EvalError(f"file not found: {path}")
  from semsam_jax.convert import convert_checkpoint
  if args.reference_config:
    return convert_checkpoint(args.torch_checkpoint, reference_config=args.reference_config)
  if config is None:
    raise EvalError("--torch-checkpoint needs --reference-config YAML or --config")
  return convert_checkpoint(args.torch_checkpoint, config=config)


def _atomic_write(path: pathlib.Path, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _gather(evaluator, skipped, num_images):
  """All processes' per-image results and skip logs, merged in dataset order
  (the first ``num_images`` usable images, as one process would stop)."""
  from semsam_jax import evaluation as ev
  from semsam_jax.distributed import allgather_bytes
  mine = json.dumps({"results": evaluator.results, "entries": skipped.entries,
                     "positions": skipped.positions, "devices": evaluator.num_devices})
  parts = [json.loads(b) for b in allgather_bytes(mine.encode())]
  results = ev.sorted_results([r for p in parts for r in p["results"]], num_images)
  logs = []
  for p in parts:
    log = ev.SkipLog()
    log.entries, log.positions = p["entries"], p["positions"]
    logs.append(log)
  up_to = results[-1]["position"] if num_images is not None and len(results) == num_images \
      else None
  return results, ev.SkipLog.merged(logs, up_to), sum(p["devices"] for p in parts)


def run(args) -> dict:
  import contextlib
  import jax
  from semsam_jax import evaluation as ev

  if args.num_images is not None and args.num_images < 1:
    raise EvalError("--num-images must be >= 1")
  if args.max_instances < 1:
    raise EvalError("--max-instances must be >= 1")
  shard = (jax.process_index(), jax.process_count())
  is_main = shard[0] == 0
  protocols = ev.PROTOCOLS if args.protocol == "all" else (args.protocol,)
  kind, where = ev.detect_format(args.dataset)
  default_min, default_max = (800, 1333) if kind == "coco" else (0, 0)
  min_size = default_min if args.min_size is None else args.min_size
  max_size = default_max if args.max_size is None else args.max_size
  out_dir = pathlib.Path(args.output)
  if out_dir.exists() and not out_dir.is_dir():
    raise EvalError(f"--output {out_dir} exists and is not a folder")

  t0 = time.time()
  config_file = _load_config_file(args.config) if args.config else None
  config, params = load_model(args, config_file)
  split = args.split or _default_split(config_file)
  opts = ev.EvalOptions(protocols=protocols, click_method=args.click, batch_size=args.batch_size,
                        mg_max_clicks=args.mg_max_clicks, seed=args.seed,
                        progress=args.progress and is_main)
  skipped = ev.SkipLog()
  if kind == "coco":
    image_dir = args.image_dir or where["image_dir"]
    images = ev.iter_coco(where["annotation_file"], image_dir, args.num_images, min_size,
                          max_size, skipped, shard=shard, max_instances=args.max_instances)
    source = {"format": "coco", "annotation_file": str(where["annotation_file"]),
              "image_dir": str(image_dir)}
  else:
    images = ev.iter_semsam_data(where["data_dir"], split, args.num_images, min_size,
                                 max_size, skipped, shard=shard,
                                 max_instances=args.max_instances)
    source = {"format": "semsam_data", "data_dir": str(where["data_dir"]), "split": split}
  precision = (contextlib.nullcontext() if args.precision == "default"
               else jax.default_matmul_precision(args.precision))
  evaluator = ev.Evaluator(config, params, opts)     # this process's devices
  with precision:
    evaluator.evaluate(images, total=args.num_images)
  results, skipped, devices = _gather(evaluator, skipped, args.num_images)
  metrics, records = ev.metrics_of(results, protocols)
  elapsed = time.time() - t0
  if not results:
    raise EvalError(f"no image could be evaluated in {args.dataset}\n{skipped.summary()}")

  table = ev.format_table(metrics)
  report = {
      "metrics": metrics,
      "settings": {"protocols": list(protocols), "click": args.click, "min_size": min_size,
                   "max_size": max_size, "mg_max_clicks": args.mg_max_clicks, "seed": args.seed,
                   "batch_size": evaluator.batch_size, "processes": shard[1],
                   "devices": devices, "max_instances": args.max_instances,
                   "checkpoint": args.checkpoint or args.torch_checkpoint},
      "dataset": source,
      "skipped": {"counts": skipped.counts(), "entries": skipped.entries},
      "seconds": round(elapsed, 1),
  }
  if not is_main:
    return report
  try:            # created only now: a failed run leaves no empty folder behind
    out_dir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise EvalError(f"cannot create output folder {out_dir}: {e}") from None
  # Each file whole (temp + rename); metrics.json, the summary, last.
  if "coco_interactive" in protocols:
    _atomic_write(out_dir / "instances.json", json.dumps(records, indent=0) + "\n")
  _atomic_write(out_dir / "metrics.md", table + "\n")
  _atomic_write(out_dir / "metrics.json", json.dumps(report, indent=1) + "\n")
  print(table)
  print(f"\n{len(results)} image(s) in {elapsed:.1f} s; {skipped.summary()}")
  print(f"results: {out_dir / 'metrics.json'}, {out_dir / 'metrics.md'}")
  return report


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  from semsam_jax.distributed import initialize_from_env
  initialize_from_env(auto=args.distributed)
  try:
    run(args)
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  except EvalError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except (ValueError, OSError, ImportError, NotImplementedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
