"""The main demo: synthetic data -> train -> evaluate -> predict, on a fresh machine.

    python -m semsam_jax.demo [--output out] [--steps N] [--config configs/tiny.py]

Stages, each the project's own command line run as a subprocess (the commands
are printed, so every stage can be rerun by hand):

1. the synthetic dataset of the config (train split and a held-out split of
   another seed), generated and built into the data cache on first use;
2. ``train.py`` on it for ``--steps`` steps (resumes if ``OUTPUT/train``
   already holds a checkpoint);
3. ``eval.py`` on the held-out split: the COCO-style interactive protocol
   (1-IoU Max / Oracle, NoC) and the multi-granularity protocol;
4. ``python -m semsam_jax predict`` on a held-out image with clicks inside a
   small part and inside a whole object (all six granularities per click), and
   ``python -m semsam_jax auto`` (the automatic mask generator) on it;
5. the loss curve (PNG) and a metrics table (Markdown + JSON).

Everything lands in ``OUTPUT`` (``train/``, ``eval/``, ``predict/``, ``auto/``,
``loss.png``, ``metrics.md``, ``metrics.json``).  ``--steps 0`` skips training
and evaluates ``--checkpoint`` instead (default: the committed tiny checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


class DemoError(Exception):
  """A stage failed; reported as one line with exit status 1."""


def _run(cmd: list[str], what: str) -> None:
  print(f"\n==> {what}\n    {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
  t0 = time.time()
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
  res = subprocess.run(cmd, cwd=REPO_ROOT, env=env)
  if res.returncode != 0:
    raise DemoError(f"{what} failed (exit status {res.returncode}); command: "
                    f"{' '.join(shlex.quote(c) for c in cmd)}")
  print(f"    done in {time.time() - t0:.0f} s", flush=True)


def pick_clicks(masks) -> list[tuple[str, int, int]]:
  """A click deep inside the smallest mask (a part) and one inside the largest
  mask that contains it (the whole it belongs to), as (label, x, y) pixels."""
  import numpy as np
  from scipy import ndimage
  areas = masks.reshape(len(masks), -1).sum(1)
  order = [int(i) for i in np.argsort(areas) if areas[i] > 0]
  if not order:
    raise DemoError("the held-out image has no mask to click on")
  part = order[0]
  dist = ndimage.distance_transform_edt(np.pad(masks[part], 1))[1:-1, 1:-1]
  y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
  clicks = [("part", int(x), int(y))]
  containing = [i for i in order if masks[i][y, x]]
  whole = containing[-1]
  if whole != part:
    d2 = ndimage.distance_transform_edt(np.pad(masks[whole] & ~masks[part], 1))[1:-1, 1:-1]
    y2, x2 = np.unravel_index(int(np.argmax(d2)), d2.shape)
    clicks.append(("object", int(x2), int(y2)))
  return clicks


def loss_stats(metrics_file: pathlib.Path) -> dict:
  """Mean logged loss over the first and the last 10 % of the finite records."""
  import numpy as np
  rows = [json.loads(l) for l in metrics_file.read_text().splitlines() if l.strip()]
  loss = np.array([r["loss"] for r in rows if "loss" in r and r.get("finite", True)], np.float64)
  if not loss.size:
    raise DemoError(f"no finite loss values in {metrics_file}")
  q = max(1, len(loss) // 10)
  return {"first_steps_mean_loss": float(loss[:q].mean()),
          "last_steps_mean_loss": float(loss[-q:].mean()), "logged_points": int(len(loss))}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m semsam_jax.demo", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--output", default="out", help="output folder (default: out)")
  ap.add_argument("--config", default="configs/tiny.py", help="training config")
  ap.add_argument("--steps", type=int, default=1000,
                  help="training steps (default: 1000, about 10 minutes on 2 CPU cores); "
                       "0: no training, evaluate --checkpoint")
  ap.add_argument("--checkpoint", default=None,
                  help="with --steps 0: the checkpoint to evaluate (default: the committed one)")
  ap.add_argument("--num-eval-images", type=int, default=None,
                  help="evaluate only the first N held-out images")
  args = ap.parse_args(argv)
  try:
    run(args)
  except DemoError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("error: interrupted", file=sys.stderr)
    return 130
  return 0


def run(args) -> None:
  import numpy as np
  from PIL import Image
  from semsam_jax.config import load_config_file
  from semsam_jax.data import ensure_dataset, read_split

  if args.steps < 0:
    raise DemoError("--steps must be >= 0")
  out = pathlib.Path(args.output).absolute()
  out.mkdir(parents=True, exist_ok=True)
  py = sys.executable
  config_path = str(REPO_ROOT / args.config) if not os.path.isabs(args.config) else args.config
  try:
    config = load_config_file(config_path)
  except (FileNotFoundError, ValueError) as e:
    raise DemoError(str(e)) from None
  t_start = time.time()

  print("==> synthetic dataset (generated and built on first use)", flush=True)
  data_dir = ensure_dataset(config.data)
  print(f"    {data_dir}", flush=True)

  summary: dict = {"config": args.config, "data_dir": data_dir}
  if args.steps > 0:
    workdir = out / "train"
    _run([py, str(REPO_ROOT / "train.py"), f"--config={config_path}", f"--workdir={workdir}",
          f"--config.total_steps={args.steps}"], f"train {args.config} for {args.steps} steps")
    checkpoint = workdir / "export"
    _run([py, str(REPO_ROOT / "scripts" / "plot_loss.py"), str(workdir),
          f"--output={out / 'loss.png'}", "--title=configs/tiny.py on the synthetic data"],
         "loss curve")
    summary["loss"] = loss_stats(workdir / "metrics.jsonl")
    summary["train_steps"] = args.steps
  else:
    from semsam_jax import evaluation
    checkpoint = pathlib.Path(args.checkpoint or REPO_ROOT / (evaluation.DEFAULT_CHECKPOINT or ""))
    if not (checkpoint / "config.json").is_file():
      raise DemoError(f"no checkpoint at {checkpoint} (pass --checkpoint or train: --steps N)")
  summary["checkpoint"] = str(checkpoint)

  eval_cmd = [py, str(REPO_ROOT / "eval.py"), f"--config={config_path}",
              f"--checkpoint={checkpoint}", f"--dataset={data_dir}",
              f"--split={config.data.eval_split}", f"--output={out / 'eval'}"]
  if args.num_eval_images:
    eval_cmd.append(f"--num-images={args.num_eval_images}")
  _run(eval_cmd, "evaluate on the held-out split (both protocols)")
  summary["eval"] = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]

  heldout = read_split(data_dir, config.data.eval_split)
  ex = heldout[0]
  image_path = out / "heldout_image.png"
  Image.fromarray(ex["image"]).save(image_path)
  clicks = pick_clicks(ex["masks"])
  points = ";".join(f"{x},{y}" for _, x, y in clicks)
  summary["clicks"] = [{"inside": k, "x": x, "y": y} for k, x, y in clicks]
  _run([py, "-m", "semsam_jax", "predict", f"--checkpoint={checkpoint}",
        f"--image={image_path}", f"--points={points}", "--short-side=0",
        f"--output-dir={out / 'predict'}"],
       "predict: the six granularities of a click in a part and one in the whole object")
  _run([py, "-m", "semsam_jax", "auto", f"--checkpoint={checkpoint}", f"--image={image_path}",
        "--short-side=0", "--points-per-side=16", f"--output-dir={out / 'auto'}"],
       "automatic mask generator")

  summary["seconds"] = round(time.time() - t_start, 1)
  (out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
  m = summary["eval"]
  lines = ["| metric | value |", "|---|---|"]
  for key in ("coco_interactive.miou_max", "coco_interactive.miou_oracle",
              "coco_interactive.noc@0.85_max", "coco_interactive.noc@0.9_max",
              "coco_interactive.num_instances", "multi_granularity.miou",
              "multi_granularity.num_pairs"):
    if key in m:
      v = m[key]
      lines.append(f"| {key} | {v:.4f} |" if isinstance(v, float) else f"| {key} | {v} |")
  if "loss" in summary:
    lines.append(f"| mean loss, first 10% of logged steps | {summary['loss']['first_steps_mean_loss']:.3f} |")
    lines.append(f"| mean loss, last 10% of logged steps | {summary['loss']['last_steps_mean_loss']:.3f} |")
  (out / "metrics.md").write_text("\n".join(lines) + "\n")
  print("\n" + "\n".join(lines))
  print(f"\nDemo done in {summary['seconds']:.0f} s. Outputs in {out}:")
  for name, what in (("loss.png", "training loss curve"), ("eval/metrics.md", "evaluation table"),
                     ("predict", "six granularities per click (prompt*_by_iou.png)"),
                     ("auto/masks.png", "automatic masks"), ("metrics.md", "summary table"),
                     ("metrics.json", "everything as JSON")):
    if (out / name).exists():
      print(f"  {out / name}: {what}")


if __name__ == "__main__":
  sys.exit(main())
