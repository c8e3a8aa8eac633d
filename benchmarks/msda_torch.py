"""PyTorch side of ``benchmarks/msda.py``: the reference's pure-PyTorch
deformable attention (one ``grid_sample`` per level), timed on the same inputs.

Runs in an interpreter that has torch and numpy but not necessarily JAX
(``benchmarks/msda.py --torch-python PATH`` starts it); torch is never a
dependency of the project.  Usage::

    python benchmarks/msda_torch.py '{"case": {...}, "modes": ["fwd", "fwd+bwd"],
                                      "repeats": 5, "warmup": 1, "threads": 2}'

prints one ``ROW {json}`` line per mode (median/min seconds, peak RSS).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import msda_cases  # noqa: E402  (numpy only)


def grid_sample_msda(value, levels, loc, aw):
  """value (B,S,M,D), loc (B,Lq,M,L,P,2) in [0,1], aw (B,Lq,M,L,P) -> (B,Lq,M*D).

  Each level is viewed as a (B*M, D, H, W) image and sampled at ``2*loc - 1``
  with bilinear, zero-padded, align_corners=False ``grid_sample``; the
  samples of all levels and points are stacked and reduced with the weights.
  """
  b, _, m, d = value.shape
  lq, n_lvl, p = loc.shape[1], loc.shape[3], loc.shape[4]
  grid = loc * 2.0 - 1.0
  per_level = torch.split(value, [h * w for h, w in levels], dim=1)
  samples = []
  for lvl, (h, w) in enumerate(levels):
    img = per_level[lvl].permute(0, 2, 3, 1).reshape(b * m, d, h, w)
    pts = grid[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(b * m, lq, p, 2)
    samples.append(F.grid_sample(img, pts, mode="bilinear", padding_mode="zeros",
                                 align_corners=False))                  # (B*M, D, Lq, P)
  stacked = torch.stack(samples, dim=3).reshape(b * m, d, lq, n_lvl * p)
  weights = aw.permute(0, 2, 1, 3, 4).reshape(b * m, 1, lq, n_lvl * p)
  out = (stacked * weights).sum(-1)                                       # (B*M, D, Lq)
  return out.reshape(b, m * d, lq).permute(0, 2, 1).contiguous()


def _time(fn, warmup: int, repeats: int) -> dict:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"median": statistics.median(times), "min": min(times)}


def main() -> None:
  cfg = json.loads(sys.argv[1])
  torch.set_num_threads(int(cfg.get("threads", 2)))
  case = cfg["case"]
  levels = [tuple(hw) for hw in case["levels"]]
  arrays = msda_cases.make_inputs(case, seed=int(cfg.get("seed", 0)))
  value = torch.from_numpy(arrays["value"])
  loc = torch.from_numpy(arrays["sampling_locations"])
  aw = torch.from_numpy(arrays["attention_weights"])
  cot = torch.from_numpy(arrays["cotangent"])
  leaves = [t.clone().requires_grad_() for t in (value, loc, aw)]

  def fwd():
    with torch.no_grad():
      return grid_sample_msda(value, levels, loc, aw)

  def fwd_bwd():
    for t in leaves:
      t.grad = None
    out = grid_sample_msda(leaves[0], levels, leaves[1], leaves[2])
    out.backward(cot)
    return out

  label = f"torch {torch.__version__} grid_sample ({torch.get_num_threads()} thr)"
  for mode in cfg.get("modes", ["fwd", "fwd+bwd"]):
    fn = fwd if mode == "fwd" else fwd_bwd
    t = _time(fn, int(cfg.get("warmup", 1)), int(cfg.get("repeats", 5)))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("ROW " + json.dumps({"impl": label, "mode": mode, "median": t["median"],
                               "min": t["min"], "peak_rss_mb": peak}), flush=True)


if __name__ == "__main__":
  main()
