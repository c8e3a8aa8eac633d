"""PyTorch side of benchmarks/msda.py: the reference's pure-PyTorch deformable
attention (per-level ``grid_sample``), timed on the same shapes.

Run by benchmarks/msda.py with an interpreter that has torch
(``--torch-python``); prints one JSON line. torch is never a project dependency.
"""

import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


def msda_grid_sample(value, shapes, loc, aw):
  n, _, m, d = value.shape
  _, lq, _, nl, p, _ = loc.shape
  per_level = value.split([h * w for h, w in shapes], dim=1)
  grids = 2 * loc - 1
  samples = []
  for lvl, (h, w) in enumerate(shapes):
    v = per_level[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
    g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
    samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                 align_corners=False))
  weights = aw.transpose(1, 2).reshape(n * m, 1, lq, nl * p)
  out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)
  return out.view(n, m * d, lq).transpose(1, 2)


def main():
  cfg = json.loads(sys.argv[1])
  torch.set_num_threads(cfg["threads"])
  shapes = [tuple(s) for s in cfg["shapes"]]
  s = sum(h * w for h, w in shapes)
  g = torch.Generator().manual_seed(0)
  b, lq, m, d, p = cfg["batch"], cfg["queries"], cfg["heads"], cfg["dim"], cfg["points"]
  value = torch.randn(b, s, m, d, generator=g, requires_grad=True)
  loc = (torch.rand(b, lq, m, len(shapes), p, 2, generator=g) * 1.1 - 0.05).requires_grad_()
  aw = torch.rand(b, lq, m, len(shapes), p, generator=g).requires_grad_()

  def fwd():
    with torch.no_grad():
      msda_grid_sample(value, shapes, loc, aw)

  def fwd_bwd():
    out = msda_grid_sample(value, shapes, loc, aw)
    (out * out).sum().backward()

  res = {"torch": torch.__version__}
  for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
    fn()
    times = []
    for _ in range(cfg["repeats"]):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    res[name] = float(np.median(times))
  print(json.dumps(res))


if __name__ == "__main__":
  main()
