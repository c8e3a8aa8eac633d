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
(apart), the XLA FLOP count, the float32 matrix-product rate (2048² x 2048²)
measured right before and after every timed run (the faster of the two; the
column shows the median over the runs), "floor" = FLOPs / that rate,
"x floor" = the median over the runs of (run time / its own floor), and the
peak RSS.  Pairing every run with the rate measured around it keeps the
ratio meaningful on a shared machine whose speed drifts within seconds.

FLOPs are those of the *reference formulation*: the same function compiled
without chunking, with the plain "gather" deformable attention and the XLA
window attention, so that the count does not depend on the implementation
being timed (XLA counts a loop body once, and a native kernel's work not at
all).
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

HEADERS = ["model", "what", "median s", "compile s", "XLA GFLOP", "matmul GFLOP/s", "floor s",
           "x floor", "peak RSS MiB"]


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
  ref.window_attention_impl = "xla"
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


def bench(backbone: str, size: int, impl: str, dtype: str, repeats: int, small: bool,
          amg: bool, rows: list) -> None:
  cfg = tiny_config() if small else model_config(backbone)
  cfg.msda_impl = impl
  cfg.dtype = dtype
  params = ss.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  rate_n = 512 if small else 2048
  x = jnp.asarray(rng.standard_normal((1, size, size, 3)), jnp.float32)
  label = (f"{'tiny' if small else backbone} {size}² {impl}->{da.resolve_impl(impl)} {dtype}")

  embed, decode = _functions(cfg)
  ref_embed, ref_decode = _functions(reference_config(cfg))

  def ref_flops(fn, *args):
    return common.flops_of(fn.lower(*args).compile())

  def add(name, call, compile_s, flops, runs=repeats, warmup=1):
    r = common.paired_runs(call, runs, rate_n, warmup=warmup)
    ratios = [t * rate / flops for t, rate in zip(r["times"], r["rates"])] if flops else None
    rows.append([label, name, r["median"], compile_s, flops and flops / 1e9, r["rate"] / 1e9,
                 flops and flops / r["rate"], ratios and float(np.median(ratios)),
                 common.peak_rss_mb()])

  c_embed, cs, _ = common.time_compile(embed, params, x)
  fl_embed = ref_flops(ref_embed, params, x)
  add("image embedding", lambda: common.block(c_embed(params, x)), cs, fl_embed)
  emb = c_embed(params, x)

  dec = {}
  for n in (1, 200):
    boxes, pb = _clicks(n, n)
    c_dec, cs, _ = common.time_compile(decode, params, emb, boxes, pb)
    fl = ref_flops(ref_decode, params, emb, boxes, pb)
    add(f"decoder, {n} click(s), cached embedding",
        lambda c=c_dec, b=boxes, p=pb: common.block(c(params, emb, b, p)), cs, fl)
    dec[n] = (c_dec, fl)

  c_dec1, fl1 = dec[1]
  fl_first = (fl_embed or 0) + (fl1 or 0) or None
  boxes, pb = _clicks(1, 7)
  images = iter([jnp.asarray(rng.standard_normal((1, size, size, 3)), jnp.float32)
                 for _ in range(repeats + 1)])
  add("first click, model (embedding + 1-click decoder, new image)",
      lambda: common.block(c_dec1(params, c_embed(params, next(images)), boxes, pb)), None,
      fl_first)

  from semsam_jax.inference import SemanticSAMPredictor
  predictor = SemanticSAMPredictor(cfg, params)
  u8 = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(repeats + 1)]
  click = [[size * 0.45, size * 0.55]]
  t0 = time.perf_counter()
  predictor.set_image(u8[0])
  predictor.predict(points=click)
  predictor_compile = time.perf_counter() - t0
  new_images = iter(u8[1:])

  def first_click():
    predictor.set_image(next(new_images))
    predictor.predict(points=click)

  add("first click, SemanticSAMPredictor (set_image + predict, host incl.)", first_click,
      predictor_compile, fl_first, warmup=0)
  add("further click on the same image, SemanticSAMPredictor",
      lambda: predictor.predict(points=[[size * 0.3, size * 0.6]]), None, fl1)

  if amg:
    from semsam_jax.inference import SemanticSAMAutomaticMaskGenerator
    pps = 4 if small else 32
    gen = SemanticSAMAutomaticMaskGenerator(predictor, points_per_side=pps,
                                            points_per_batch=200, progress=False)
    t0 = time.perf_counter()
    gen.generate(u8[0])
    amg_compile = time.perf_counter() - t0
    batches = -(-pps * pps // 200)
    fl_amg = ((fl_embed or 0) + batches * (dec[200][1] or 0)) or None
    counts = []
    amg_images = iter(u8[1:])
    add(f"automatic masks, {pps}x{pps} clicks, {batches} batches of 200",
        lambda: counts.append(len(gen.generate(next(amg_images)))), amg_compile, fl_amg,
        warmup=0)
    rows[-1][1] += f" ({int(np.median(counts))} masks kept)"


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
  rows: list = []
  backbones = ("swin_t", "swin_l") if args.backbone == "both" else (args.backbone,)
  dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
  for bb in backbones:
    for dt in dtypes:
      bench(bb, size, args.msda_impl, dt, args.repeats, args.small, args.amg, rows)
  common.print_table(HEADERS, rows)


if __name__ == "__main__":
  main()
