"""Benchmark of the multi-scale deformable attention core: every JAX
implementation (``deformable_attention.MSDA_IMPLS``),
forward and forward+backward, beside the reference's PyTorch ``grid_sample``
version.

    python benchmarks/msda.py [--repeats 5] [--warmup 1] [--small]
                              [--torch-python /path/to/python-with-torch]
                              [--torch-threads 2] [--impls fused,gather]
                              [--cases encoder,decoder_q1200] [--decoder-queries 1200,6]
                              [--isolate | --no-isolate]

Shapes (``benchmarks/msda_cases.py``): the pixel decoder's encoder at a 1024²
input (levels 128², 64², 32²; all 21,504 positions are queries) and the
granularity decoder (levels 128²..16²; 1200 queries = 200 clicks x 6 tokens,
and 6 queries = one click); 8 heads x 32 channels, 4 points, batch 1.
``--small`` uses tiny shapes (smoke test).

Columns: median / min wall time of ``--repeats`` runs after ``--warmup``
runs (compiled executable, results blocked on), compile time (lower +
compile), XLA's FLOP count, XLA's temporary buffer size, the process's peak
RSS, and the PyTorch time of the same case and pass divided by this one.
"fwd+bwd" is ``jax.vjp`` with an output cotangent, returning the output and
all three input gradients (PyTorch: ``out.backward(cotangent)``).

With ``--isolate`` (default, except with ``--small``) every row runs in a
fresh process, so "peak RSS" is that row's own peak; without it the rows
share one process and the column is cumulative.  The PyTorch rows come from
``benchmarks/msda_torch.py`` run by ``--torch-python`` (default: this
interpreter when it has torch, else the rows say "torch not installed").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import common, msda_cases  # noqa: E402
from semsam_jax.models import deformable_attention as da  # noqa: E402

MODES = ("fwd", "fwd+bwd")
HEADERS = ["case", "implementation", "pass", "median s", "min s", "compile s", "XLA GFLOP",
           "XLA temp MiB", "peak RSS MiB", "torch / this"]


def all_impls() -> dict:
  """Every implementation to time (``deformable_attention.MSDA_IMPLS``)."""
  return dict(da.MSDA_IMPLS)


def measure_jax(impl: str, case: dict, mode: str, repeats: int, warmup: int) -> dict:
  """Compiles and times one implementation on one case; returns a row dict."""
  fn = all_impls()[impl]
  levels = tuple(tuple(hw) for hw in case["levels"])
  arrays = msda_cases.make_inputs(case)
  args = [jnp.asarray(arrays[k]) for k in ("value", "sampling_locations", "attention_weights")]

  def core(v, loc, aw):
    return fn(v, levels, loc, aw)

  if mode == "fwd":
    jitted = jax.jit(core)
  else:
    def fwd_bwd(v, loc, aw, cot):
      out, vjp = jax.vjp(core, v, loc, aw)
      return (out, *vjp(cot))
    jitted = jax.jit(fwd_bwd)
    args.append(jnp.asarray(arrays["cotangent"]))
  compiled, compile_s, flops = common.time_compile(jitted, *args)
  try:
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
  except Exception:  # backend without memory analysis
    temp_mb = None
  t = common.time_fn(compiled, *args, warmup=warmup, runs=repeats)
  return {"impl": f"jax:{impl}", "mode": mode, "median": t["median"], "min": t["min"],
          "compile": compile_s, "gflop": flops and flops / 1e9, "temp_mb": temp_mb,
          "peak_rss_mb": common.peak_rss_mb()}


def _parse_rows(proc: subprocess.CompletedProcess) -> list[dict]:
  rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
  if proc.returncode != 0 or not rows:
    tail = (proc.stderr or proc.stdout or "failed").strip().splitlines()
    raise RuntimeError(tail[-1] if tail else f"exit status {proc.returncode}")
  return rows


def jax_rows(impl: str, case: dict, args) -> list[dict]:
  rows = []
  for mode in MODES:
    try:
      if args.isolate:
        job = {"impl": impl, "case": case, "mode": mode, "repeats": args.repeats,
               "warmup": args.warmup}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker",
                               json.dumps(job)], capture_output=True, text=True)
        rows.extend(_parse_rows(proc))
      else:
        rows.append(measure_jax(impl, case, mode, args.repeats, args.warmup))
    except Exception as e:  # keep the other rows of the table
      rows.append({"impl": f"jax:{impl}", "mode": mode, "error": str(e)[:120]})
  return rows


def torch_python(args) -> str | None:
  if args.torch_python:
    return args.torch_python
  return sys.executable if importlib.util.find_spec("torch") is not None else None


def torch_rows(python: str | None, case: dict, args) -> list[dict]:
  if python is None:
    return [{"impl": "torch grid_sample", "mode": "-", "error": "torch not installed"}]
  script = os.path.join(HERE, "msda_torch.py")
  groups = [[m] for m in MODES] if args.isolate else [list(MODES)]
  rows = []
  for modes in groups:
    cfg = {"case": case, "modes": modes, "repeats": args.repeats, "warmup": args.warmup,
           "threads": args.torch_threads}
    try:
      proc = subprocess.run([python, script, json.dumps(cfg)], capture_output=True, text=True)
      rows.extend(_parse_rows(proc))
    except Exception as e:
      rows.append({"impl": "torch grid_sample", "mode": "/".join(modes), "error": str(e)[:120]})
  return rows


def table_row(case_name: str, r: dict, torch_median: dict) -> list:
  if "error" in r:
    return [case_name, r["impl"], r["mode"], None, None, None, None, None, None, r["error"]]
  ref = torch_median.get(r["mode"])
  ratio = ref / r["median"] if ref and not r["impl"].startswith("torch") else None
  return [case_name, r["impl"], r["mode"], r["median"], r["min"], r.get("compile"),
          r.get("gflop"), r.get("temp_mb"), r.get("peak_rss_mb"), ratio]


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--repeats", type=int, default=5, help="timed runs per row (median)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
  ap.add_argument("--small", action="store_true", help="tiny shapes, for a smoke test")
  ap.add_argument("--impls", default=None, help="comma-separated subset of implementations")
  ap.add_argument("--cases", default=None, help="comma-separated subset of cases")
  ap.add_argument("--decoder-queries", default="1200,6",
                  help="query counts of the decoder cases (default 1200,6)")
  ap.add_argument("--torch-python", default=None,
                  help="interpreter with torch for the grid_sample rows (default: this "
                       "one if it has torch)")
  ap.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads")
  ap.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                  help="one fresh process per row (default unless --small)")
  ap.add_argument("--no-isolate", dest="isolate", action="store_false")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)

  if args.worker:  # one isolated row, printed for the parent process
    job = json.loads(args.worker)
    row = measure_jax(job["impl"], job["case"], job["mode"], job["repeats"], job["warmup"])
    print("ROW " + json.dumps(row), flush=True)
    return

  if args.isolate is None:
    args.isolate = not args.small
  impls = all_impls()
  names = args.impls.split(",") if args.impls else list(impls)
  unknown = [n for n in names if n not in impls]
  if unknown:
    ap.error(f"unknown implementation(s) {unknown}; valid: {sorted(impls)}")
  cases = msda_cases.cases(args.small, [int(q) for q in args.decoder_queries.split(",")])
  if args.cases:
    cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}

  print(common.machine_line())
  if not args.small:
    print(f"float32 matmul rate (2048², jit): {common.matmul_rate() / 1e9:.1f} GFLOP/s")
  python = torch_python(args)
  if python is None:
    print("torch not installed (pass --torch-python PATH for the grid_sample rows)")
  print(f"median of {args.repeats} run(s) after {args.warmup} warm-up run(s); "
        f"{'one process per row' if args.isolate else 'one process (peak RSS cumulative)'}")
  table = []
  for case_name, case in cases.items():
    t_rows = torch_rows(python, case, args)
    torch_median = {r["mode"]: r["median"] for r in t_rows if "error" not in r}
    for impl in names:
      table.extend(table_row(case_name, r, torch_median) for r in jax_rows(impl, case, args))
    table.extend(table_row(case_name, r, torch_median) for r in t_rows)
  common.print_table(HEADERS, table)


if __name__ == "__main__":
  main()
