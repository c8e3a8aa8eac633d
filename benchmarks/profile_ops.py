"""Where the image embedding's time goes: a per-op table from one profiled run.

    python benchmarks/profile_ops.py [--backbone swin_t] [--size 1024] [--top 30]
                                     [--msda-impl auto] [--runs 2] [--depth 3] [--small]

Compiles ``SemanticSAM.embed_image`` (random parameters), runs it once to warm
up, then ``--runs`` times under ``jax.profiler.trace`` and adds up the
durations of every executed XLA thunk (a fusion, a library matrix product, a
custom call, one event per loop iteration).  Thunks are grouped by the
source-level name XLA keeps in the HLO metadata (``op_name``), shortened to the
module path, so the table reads "which part of the model, which kind of op".
Times are per run; loop thunks (``while``) are left out because the thunks of
their bodies are events of their own.  The sum need not equal the wall time:
XLA:CPU runs independent thunks on both threads at once, and the profile sees
thunks only, not the gaps between them.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from semsam_jax.config import model_config  # noqa: E402
from semsam_jax.models import semantic_sam as ss  # noqa: E402


def _op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> metadata op_name for every instruction of the HLO."""
  names = {}
  pat = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")
  for line in hlo_text.splitlines():
    m = pat.match(line)
    if m:
      names[m.group(1)] = m.group(2)
  return names


def _short(op_name: str, depth: int) -> str:
  """'jit(<lambda>)/jit(main)/SemanticSAM.embed_image/backbone/layers_2/...'
  -> the module path to ``depth`` parts plus the primitive."""
  parts = [p for p in op_name.split("/") if not p.startswith("jit(")]
  prim = parts[-1] if parts else "?"
  mods = [p for p in parts[:-1] if not p.startswith(("while", "body", "cond", "checkpoint",
                                                      "scan", "vmap", "jvp", "transpose",
                                                      "pjit", "closed_call"))]
  mods = [re.sub(r"_\d+$", "_*", p) for p in mods]
  return "/".join(mods[:depth] + [prim])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--backbone", default="swin_t", choices=["swin_t", "swin_l"])
  ap.add_argument("--size", type=int, default=1024)
  ap.add_argument("--msda-impl", default="auto")
  ap.add_argument("--runs", type=int, default=2)
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--depth", type=int, default=3, help="module-path parts kept per row")
  ap.add_argument("--small", action="store_true", help="tiny model at 64² (smoke test)")
  args = ap.parse_args()

  if args.small:
    from benchmarks.inference import tiny_config
    cfg, args.size = tiny_config(), 64
  else:
    cfg = model_config(args.backbone)
  cfg.msda_impl = args.msda_impl
  model = ss.SemanticSAM(ss.freeze_config(cfg))
  params = ss.init_params(cfg, jax.random.PRNGKey(0))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, args.size, args.size, 3)),
                  jnp.float32)
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=ss.SemanticSAM.embed_image))
  compiled = fn.lower(params, x).compile()
  names = _op_names(compiled.as_text())
  common.block(compiled(params, x))

  with tempfile.TemporaryDirectory() as tmp:
    import time
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(args.runs):
        common.block(compiled(params, x))
    wall = (time.perf_counter() - t0) / args.runs
    path = glob.glob(os.path.join(tmp, "plugins", "profile", "*", "perfetto_trace.json.gz"))[0]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace

  skip = ("ThreadpoolListener", "end: ", "ThunkExecutor", "$", "PjitFunction",
          "CommonPjRt", "Handle ", "Allocate", "Wait for", "ParseArguments",
          "PythonRefManager", "SlinkyThreadPool")
  containers = ("while", "conditional", "call")     # their bodies' thunks are events too
  by_group = collections.defaultdict(float)
  by_kind = collections.defaultdict(float)
  total = 0.0
  for e in events:
    name, dur = e.get("name"), e.get("dur")
    if e.get("ph") != "X" or not name or dur is None or name.startswith(skip):
      continue
    kind = re.sub(r"[.]\d+$", "", name)
    if kind in containers:
      continue
    op = names.get(name, "")
    group = _short(op, args.depth) if op else f"<{kind}>"
    if op:   # the primitive the thunk comes from (fusions: their root's)
      kind = op.split("/")[-1]
    by_group[group] += dur / 1e6 / args.runs
    by_kind[kind] += dur / 1e6 / args.runs
    total += dur / 1e6 / args.runs

  print(common.machine_line())
  print(f"{'tiny' if args.small else args.backbone} {args.size}² image embedding: {wall:.3f} s per run (profiled), "
        f"{total:.3f} s in thunks (summed over threads)")
  rows = [[g, t, 100 * t / total] for g, t in sorted(by_group.items(), key=lambda kv: -kv[1])]
  common.print_table(["model part / primitive", "s per run", "% of thunk time"],
                     rows[:args.top])
  rows = [[k, t, 100 * t / total] for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1])]
  common.print_table(["primitive", "s per run", "% of thunk time"], rows[:args.top])
  # The native kernels' share: every custom call, by the model part it serves.
  kernels = [[g, t, 100 * t / total] for g, t in sorted(by_group.items(), key=lambda kv: -kv[1])
             if g.endswith("/ffi_call")]
  print(f"native kernels: {sum(r[1] for r in kernels):.3f} s per run, "
        f"{sum(r[2] for r in kernels):.1f} % of thunk time")
  common.print_table(["native kernel (model part)", "s per run", "% of thunk time"], kernels)


if __name__ == "__main__":
  main()
