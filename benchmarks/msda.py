"""Benchmark of the deformable attention implementations (forward and
forward+backward), beside the reference's PyTorch grid_sample version.

    python benchmarks/msda.py [--torch-python /path/to/python-with-torch] [--small]

Shapes: the pixel decoder's encoder at a 1024x1024 input (levels 128², 64², 32²;
every position is a query; 8 heads, 4 points, 32 channels per head) and the
granularity decoder (levels 128² .. 16², 1200 queries = 200 clicks x 6 tokens).
Prints a table: median of --repeats runs after a warm-up, compile time apart,
peak RSS of this process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from semsam_jax.models import deformable_attention as da  # noqa: E402


def shapes_for(small: bool):
  if small:
    enc = ((16, 16), (8, 8), (4, 4))
    return {"encoder": (enc, sum(h * w for h, w in enc)),
            "decoder": (enc + ((2, 2),), 60)}
  enc = ((128, 128), (64, 64), (32, 32))
  return {"encoder": (enc, sum(h * w for h, w in enc)),
          "decoder": (enc + ((16, 16),), 1200)}


def run_torch(python: str, shapes, queries: int, repeats: int, threads: int):
  cfg = dict(shapes=[list(s) for s in shapes], batch=1, queries=queries, heads=8, dim=32,
             points=4, repeats=repeats, threads=threads)
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "msda_torch.py")
  r = subprocess.run([python, script, json.dumps(cfg)], capture_output=True, text=True)
  if r.returncode != 0:
    return None, r.stderr.strip().splitlines()[-1] if r.stderr else "failed"
  return json.loads(r.stdout.strip().splitlines()[-1]), None


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
  ap.add_argument("--torch-python", default=None,
                  help="python with torch for the grid_sample rows (default: this "
                       "interpreter if it has torch)")
  ap.add_argument("--torch-threads", type=int, default=os.cpu_count() or 2)
  args = ap.parse_args()

  print(common.machine_line())
  rows = []
  rng = np.random.default_rng(0)
  for name, (shapes, lq) in shapes_for(args.small).items():
    s = sum(h * w for h, w in shapes)
    value = jnp.asarray(rng.standard_normal((1, s, 8, 32)), jnp.float32)
    loc = jnp.asarray(rng.uniform(-0.05, 1.05, (1, lq, 8, len(shapes), 4, 2)), jnp.float32)
    aw = jnp.asarray(rng.uniform(0, 1, (1, lq, 8, len(shapes), 4)), jnp.float32)
    for impl in sorted(da.MSDA_IMPLS):
      fwd = jax.jit(lambda v, l, a, impl=impl: da.ms_deform_attn(v, shapes, l, a, impl=impl))
      loss = lambda v, l, a, impl=impl: jnp.sum(da.ms_deform_attn(v, shapes, l, a, impl=impl) ** 2)
      fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      for mode, fn in (("fwd", fwd), ("fwd+bwd", fb)):
        compiled, compile_s, flops = common.time_compile(fn, value, loc, aw)
        t = common.time_fn(compiled, value, loc, aw, runs=args.repeats)
        rows.append([name, f"jax:{impl}", mode, t["median"], compile_s, flops and flops / 1e9,
                     common.peak_rss_mb()])
    python = args.torch_python
    if python is None:
      try:
        import torch  # noqa: F401
        python = sys.executable
      except ImportError:
        python = None
    if python is None:
      rows.append([name, "torch grid_sample", "-", None, None, None, "torch not installed"])
    else:
      res, err = run_torch(python, shapes, lq, args.repeats, args.torch_threads)
      if res is None:
        rows.append([name, "torch grid_sample", "-", None, None, None, err])
      else:
        rows.append([name, f"torch {res['torch']} grid_sample", "fwd", res["fwd"], None, None, "-"])
        rows.append([name, f"torch {res['torch']} grid_sample", "fwd+bwd", res["fwd_bwd"], None,
                     None, "-"])
  common.print_table(["shape", "implementation", "pass", "median s", "compile s", "XLA GFLOP",
                      "peak RSS MiB"], rows)


if __name__ == "__main__":
  main()
