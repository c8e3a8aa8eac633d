"""Plot the training loss of a run from its ``metrics.jsonl``.

    python scripts/plot_loss.py runs/tiny --output docs/assets/tiny_loss.png
"""

import argparse
import json
import os

import numpy as np


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("workdir", help="training workdir (holds metrics.jsonl)")
  ap.add_argument("--output", required=True, help="image file to write (.png)")
  ap.add_argument("--smooth", type=int, default=10, help="moving-average window (records)")
  ap.add_argument("--title", default=None)
  args = ap.parse_args(argv)
  steps, loss = [], []
  with open(os.path.join(args.workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if isinstance(rec.get("loss"), float) and rec.get("finite", True):
        steps.append(rec["step"])
        loss.append(rec["loss"])
  if not steps:
    raise SystemExit(f"{args.workdir}/metrics.jsonl has no finite loss records")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps, loss = np.asarray(steps), np.asarray(loss)
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(steps, loss, color="0.75", lw=0.8, label="loss (logged steps)")
  w = max(1, min(args.smooth, len(loss)))
  if w > 1:
    sm = np.convolve(loss, np.ones(w) / w, mode="valid")
    ax.plot(steps[w - 1:], sm, color="C0", lw=2, label=f"moving average ({w})")
  ax.set_xlabel("step")
  ax.set_ylabel("total loss (all decoder layers)")
  ax.set_title(args.title or os.path.basename(os.path.normpath(args.workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  tmp = args.output + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, args.output)
  print(f"wrote {args.output} ({len(steps)} records, steps {steps[0]}..{steps[-1]})")


if __name__ == "__main__":
  main()
