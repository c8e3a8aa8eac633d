"""End-to-end inference latency: image embedding, decoder per click and per
200-click batch, first click on a new image, beside the XLA FLOP count of each
jitted function and the float32 matmul rate measured in the same run.

    python benchmarks/inference.py [--backbone swin_t|swin_l|both] [--size 1024]
                                   [--msda-impl gather|patch] [--bf16] [--small]

"floor" = FLOPs / matmul rate: the time the work would take at the measured
matrix-product speed. Random parameters (no checkpoint needed).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from semsam_jax.config import model_config  # noqa: E402
from semsam_jax.models import semantic_sam as ss  # noqa: E402


def tiny_config():
  cfg = model_config("swin_t")
  cfg.backbone.update(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
  cfg.pixel_decoder.update(conv_dim=64, mask_dim=64, num_heads=4, dim_feedforward=128,
                           num_encoder_layers=1)
  cfg.decoder.update(hidden_dim=64, dim_feedforward=128, num_layers=2, mask_dim=64)
  return cfg


def bench(backbone: str, size: int, impl: str, dtype: str, repeats: int, rate: float,
          small: bool, rows: list) -> None:
  cfg = tiny_config() if small else model_config(backbone)
  cfg.msda_impl = impl
  cfg.dtype = dtype
  params = ss.init_params(cfg, jax.random.PRNGKey(0))
  model = ss.SemanticSAM(ss.freeze_config(cfg))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, size, size, 3)), jnp.float32)
  label = f"{'tiny' if small else backbone} {size}² {impl} {dtype}"

  embed = jax.jit(lambda p, x: model.apply({"params": p}, x, method=ss.SemanticSAM.embed_image))
  decode = jax.jit(lambda p, e, b, q: model.apply({"params": p}, e, b, q,
                                                  method=ss.SemanticSAM.decode))

  def row(name, compiled, compile_s, flops, *args):
    t = common.time_fn(compiled, *args, runs=repeats)
    floor = flops / rate if flops else None
    rows.append([label, name, t["median"], compile_s, flops and flops / 1e9, floor,
                 floor and t["median"] / floor, common.peak_rss_mb()])
    return t["median"]

  c_embed, cs, fl_embed = common.time_compile(embed, params, x)
  t_embed = row("image embedding", c_embed, cs, fl_embed, params, x)
  emb = c_embed(params, x)
  results = {}
  for n in (1, 200):
    pts = jnp.asarray(np.random.default_rng(n).uniform(0.1, 0.9, (1, n, 4)) * [1, 1, 0.01, 0.01],
                      jnp.float32)
    pb = jnp.zeros((1, n), jnp.int32)
    c_dec, cs, fl = common.time_compile(decode, params, emb, pts, pb)
    results[n] = (row(f"decoder, {n} click(s), cached embedding", c_dec, cs, fl, params, emb,
                      pts, pb), fl)
  t1, fl1 = results[1]
  total_flops = (fl_embed or 0) + (fl1 or 0)
  floor = total_flops / rate if total_flops else None
  rows.append([label, "first click (embedding + 1-click decoder)", t_embed + t1, None,
               total_flops / 1e9, floor, floor and (t_embed + t1) / floor, common.peak_rss_mb()])


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--backbone", choices=("swin_t", "swin_l", "both"), default="swin_t")
  ap.add_argument("--size", type=int, default=1024)
  ap.add_argument("--msda-impl", default="gather")
  ap.add_argument("--bf16", action="store_true", help="also time bfloat16 compute")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--small", action="store_true", help="tiny model at 64² (smoke test)")
  args = ap.parse_args()
  size = 64 if args.small else args.size
  print(common.machine_line())
  rate = common.matmul_rate(512 if args.small else 2048)
  print(f"float32 matmul rate (2048² x 2048², jit): {rate / 1e9:.1f} GFLOP/s")
  rows: list = []
  backbones = ("swin_t", "swin_l") if args.backbone == "both" else (args.backbone,)
  dtypes = ("float32", "bfloat16") if args.bf16 else ("float32",)
  for bb in backbones:
    for dt in dtypes:
      bench(bb, size, args.msda_impl, dt, args.repeats, rate, args.small, rows)
  common.print_table(["model", "what", "median s", "compile s", "XLA GFLOP", "floor s",
                      "x floor", "peak RSS MiB"], rows)


if __name__ == "__main__":
  main()
