"""Timing helpers shared by the benchmark scripts (tables, not pass/fail tests)."""

from __future__ import annotations

import functools
import platform
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def block(x):
  return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_compile(jitted, *args, **kwargs) -> tuple[Any, float, float | None]:
  """Lowers and compiles ``jitted``; returns (compiled, seconds, XLA flop count)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  secs = time.perf_counter() - t0
  return compiled, secs, flops_of(compiled)


def flops_of(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # backend without cost analysis
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  f = cost.get("flops")
  return float(f) if f is not None and f >= 0 else None


def time_fn(fn: Callable, *args, warmup: int = 1, runs: int = 5) -> dict:
  """Median/min wall time of ``fn(*args)`` (results blocked on) after warm-up."""
  for _ in range(warmup):
    block(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - t0)
  return {"median": statistics.median(times), "min": min(times), "runs": runs}


def paired_runs(call: Callable[[], Any], runs: int, rate_n: int = 2048,
                warmup: int = 1) -> dict:
  """Times ``call()`` (which must block on its results) ``runs`` times, each
  run between two measurements of the float32 matmul rate.

  On a shared machine whose speed drifts within seconds, a run is compared
  with the rate measured right around it: ``ratio_i = t_i * rate_i`` (the
  run's time times the faster of its two rate samples) divided by the FLOPs
  gives that run's distance to its floor.  Returns the times, the paired
  rates and their medians.
  """
  for _ in range(warmup):
    call()
  times, rates = [], []
  for _ in range(runs):
    before = matmul_rate(rate_n, runs=3)
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
    rates.append(max(before, matmul_rate(rate_n, runs=3)))
  return {"times": times, "rates": rates, "median": statistics.median(times),
          "rate": statistics.median(rates)}


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far (MiB)."""
  kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kb / 1024.0


def device_peak_mb() -> float | None:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:
    return None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2 ** 20


@functools.lru_cache(maxsize=None)
def _matmul_case(n: int):
  """The (n, n) float32 operand and the jitted product, made once per size
  (``paired_runs`` measures the rate twice per run)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  return jax.jit(lambda x, y: x @ y), a


def matmul_rate(n: int = 2048, runs: int = 5) -> float:
  """Measured float32 matrix-product rate of this machine (FLOP/s)."""
  f, a = _matmul_case(n)
  t = time_fn(f, a, a, warmup=2, runs=runs)
  return 2.0 * n ** 3 / t["median"]


def machine_line() -> str:
  """One line naming the machine: host, CPU model, JAX backend and, on the CPU,
  the ISA the native kernels were built for."""
  from semsam_jax.kernels import native
  dev = jax.devices()[0]
  line = (f"{platform.node()} | {native.cpu_model()} | "
          f"jax {jax.__version__} | backend {dev.platform} ({dev.device_kind}) x{jax.device_count()}")
  if dev.platform == "cpu":
    info = native.build_info()
    isa = info["isa"] or f"unavailable: {info.get('unavailable')}"
    line += f" | native kernels -march={info['arch']} ({isa})"
  return line


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
  cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  print(line(cells[0]))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for r in cells[1:]:
    print(line(r))


def _fmt(c) -> str:
  if isinstance(c, float):
    return f"{c:.4g}"
  return "-" if c is None else str(c)
