"""End-to-end inference latency beside its floor.

    python benchmarks/inference.py [--backbone swin_t|swin_l|both] [--size 1024]
                                   [--msda-impl auto] [--dtype float32|bfloat16|both]
                                   [--repeats 3] [--no-amg] [--small]

Rows (random parameters, no checkpoint needed; a new random image for every
timed run of the "first click" rows):

* image embedding (backbone + pixel decoder + every decoder layer's value
  projection of the memory), one jitted call;
* decoder with a cached embedding, 1 click and 200 clicks;
* first click, model level: embedding + 1-click decoder, back to back;
* first click through ``SemanticSAMPredictor`` (``set_image`` + ``predict``
  of one click: host-side padding, the device calls, the upsampling of the
  six masks to the image size and the transfer to numpy) and a further click
  on the same image;
* automatic mask generation of one image (32 x 32 clicks in batches of 200,
  six levels, default filters; with random weights few masks pass them, so
  the host post-processing is light).

Columns: median of ``--repeats`` runs after one warm-up, compile time
(apart), the XLA FLOP count, "floor" = FLOPs / the float32 matrix-product
rate measured in the same run (2048² x 2048², at the start and at the end;
the faster of the two), "x floor" = median / floor, and the peak RSS.

FLOPs are those of the *reference formulation*: the same function compiled
without chunking and with the plain "gather" deformable attention, so that
the count does not depend on the implementation being timed (XLA counts a
loop body once, and a native kernel's work not at all).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from semsam_jax.config import model_config  # noqa: E402
from semsam_jax.models import deformable_attention as da  # noqa: E402
from semsam_jax.models import semantic_sam as ss  # noqa: E402

HEADERS = ["model", "what", "median s", "compile s", "XLA GFLOP", "floor s", "x floor",
           "peak RSS MiB"]


def tiny_config():
  cfg = model_config("swin_t")
  cfg.backbone.update(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
  cfg.pixel_decoder.update(conv_dim=64, mask_dim=64, num_heads=4, dim_feedforward=128,
                           num_encoder_layers=1)
  cfg.decoder.update(hidden_dim=64, dim_feedforward=128, num_layers=2, mask_dim=64)
  return cfg


def reference_config(cfg):
  """``cfg`` computing the same function in the reference formulation."""
  ref = cfg.copy_and_resolve_references()
  ref.msda_impl = "gather"
  ref.memory_token_chunk = 0
  ref.backbone_token_chunk = 0
  return ref


def _functions(cfg):
  model = ss.SemanticSAM(ss.freeze_config(cfg))
  embed = jax.jit(lambda p, x: model.apply({"params": p}, x, method=ss.SemanticSAM.embed_image))
  decode = jax.jit(lambda p, e, b, q: model.apply({"params": p}, e, b, q,
                                                  method=ss.SemanticSAM.decode))
  return embed, decode


def _clicks(n: int, seed: int):
  pts = np.random.default_rng(seed).uniform(0.1, 0.9, (1, n, 4)) * [1, 1, 0.01, 0.01]
  return jnp.asarray(pts, jnp.float32), jnp.zeros((1, n), jnp.int32)


def bench(backbone: str, size: int, impl: str, dtype: str, repeats: int, rate: float,
          small: bool, amg: bool, rows: list) -> None:
  cfg = tiny_config() if small else model_config(backbone)
  cfg.msda_impl = impl
  cfg.dtype = dtype
  params = ss.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, size, size, 3)), jnp.float32)
  label = (f"{'tiny' if small else backbone} {size}² {impl}->{da.resolve_impl(impl)} {dtype}")

  embed, decode = _functions(cfg)
  ref_embed, ref_decode = _functions(reference_config(cfg))

  def ref_flops(fn, *args):
    return common.flops_of(fn.lower(*args).compile())

  def add(name, median, compile_s, flops):
    floor = flops / rate if flops else None
    rows.append([label, name, median, compile_s, flops and flops / 1e9, floor,
                 floor and median / floor, common.peak_rss_mb()])

  c_embed, cs, _ = common.time_compile(embed, params, x)
  fl_embed = ref_flops(ref_embed, params, x)
  t_embed = common.time_fn(c_embed, params, x, runs=repeats)["median"]
  add("image embedding", t_embed, cs, fl_embed)
  emb = c_embed(params, x)

  dec = {}
  for n in (1, 200):
    boxes, pb = _clicks(n, n)
    c_dec, cs, _ = common.time_compile(decode, params, emb, boxes, pb)
    fl = ref_flops(ref_decode, params, emb, boxes, pb)
    t = common.time_fn(c_dec, params, emb, boxes, pb, runs=repeats)["median"]
    add(f"decoder, {n} click(s), cached embedding", t, cs, fl)
    dec[n] = (c_dec, fl)

  c_dec1, fl1 = dec[1]
  fl_first = (fl_embed or 0) + (fl1 or 0) or None
  boxes, pb = _clicks(1, 7)
  images = [jnp.asarray(rng.standard_normal((1, size, size, 3)), jnp.float32)
            for _ in range(repeats + 1)]
  times = []
  for i, img in enumerate(images):
    t0 = time.perf_counter()
    common.block(c_dec1(params, c_embed(params, img), boxes, pb))
    if i:  # the first one is the warm-up
      times.append(time.perf_counter() - t0)
  add("first click, model (embedding + 1-click decoder)", float(np.median(times)), None,
      fl_first)

  from semsam_jax.inference import SemanticSAMPredictor
  predictor = SemanticSAMPredictor(cfg, params)
  u8 = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(repeats + 1)]
  click = [[size * 0.45, size * 0.55]]
  t0 = time.perf_counter()
  predictor.set_image(u8[0])
  predictor.predict(points=click)
  predictor_compile = time.perf_counter() - t0
  times, further = [], []
  for img in u8[1:]:
    t0 = time.perf_counter()
    predictor.set_image(img)
    predictor.predict(points=click)
    times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    predictor.predict(points=[[size * 0.3, size * 0.6]])
    further.append(time.perf_counter() - t0)
  add("first click, SemanticSAMPredictor (set_image + predict, host incl.)",
      float(np.median(times)), predictor_compile, fl_first)
  add("further click on the same image, SemanticSAMPredictor", float(np.median(further)), None,
      fl1)

  if amg:
    from semsam_jax.inference import SemanticSAMAutomaticMaskGenerator
    pps = 4 if small else 32
    gen = SemanticSAMAutomaticMaskGenerator(predictor, points_per_side=pps,
                                            points_per_batch=200, progress=False)
    t0 = time.perf_counter()
    gen.generate(u8[0])
    amg_compile = time.perf_counter() - t0
    times, counts = [], []
    for img in u8[1:]:
      t0 = time.perf_counter()
      counts.append(len(gen.generate(img)))
      times.append(time.perf_counter() - t0)
    batches = -(-pps * pps // 200)
    fl_dec200 = dec[200][1]
    fl_amg = ((fl_embed or 0) + batches * (fl_dec200 or 0)) or None
    add(f"automatic masks, {pps}x{pps} clicks, {batches} batches of 200 "
        f"(median {int(np.median(counts))} masks kept)", float(np.median(times)),
        amg_compile, fl_amg)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--backbone", choices=("swin_t", "swin_l", "both"), default="swin_t")
  ap.add_argument("--size", type=int, default=1024)
  ap.add_argument("--msda-impl", default="auto", choices=da.IMPL_CHOICES)
  ap.add_argument("--dtype", choices=("float32", "bfloat16", "both"), default="float32",
                  help="compute dtype (bfloat16 accuracy: benchmarks/bf16_accuracy.py)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--no-amg", dest="amg", action="store_false",
                  help="skip the automatic mask generation row")
  ap.add_argument("--small", action="store_true", help="tiny model at 64² (smoke test)")
  args = ap.parse_args()
  size = 64 if args.small else args.size
  print(common.machine_line())
  n = 512 if args.small else 2048
  rate = common.matmul_rate(n)
  rows: list = []
  backbones = ("swin_t", "swin_l") if args.backbone == "both" else (args.backbone,)
  dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
  for bb in backbones:
    for dt in dtypes:
      bench(bb, size, args.msda_impl, dt, args.repeats, rate, args.small, args.amg, rows)
  # The machine's speed can drift during a long run: the rate is measured
  # again at the end and every floor uses the faster of the two (the floor
  # is then never overstated).
  rate_end = common.matmul_rate(n)
  best = max(rate, rate_end)
  print(f"float32 matmul rate ({n}² x {n}², jit): {rate / 1e9:.1f} GFLOP/s at the start, "
        f"{rate_end / 1e9:.1f} at the end; floors use {best / 1e9:.1f}")
  for r in rows:
    if r[4] is not None:
      r[5] = r[4] * 1e9 / best
      r[6] = r[2] / r[5]
  common.print_table(HEADERS, rows)


if __name__ == "__main__":
  main()
