"""Every native kernel's outputs on fixed random inputs, saved to an .npz
(argv[1]); ``test_native_isa.py`` runs it once per ISA build
(``SEMSAM_JAX_NATIVE_ARCH``) and compares the builds.

Covers both deformable-attention paths (16 samples per head: the vectorised
corner geometry; 6 samples: the generic lanes), 32 and 24 channels (register
and generic channel loops), forward, backward and the query forward; window
attention with and without the shifted-window mask (windows of 7 and 12: the
register paths; 5: generic); the mask threshold counts; and the objective's
point reads (maps forward and gradient, packed masks, uncertainty sampling).
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

MSDA_CASES = {"lp16_d32": (4, 4, 32), "lp6_d24": (3, 2, 24)}
WINDOW_CASES = ((7, 64, 2), (12, 48, 3), (5, 40, 2))   # window, channels, heads
LEVEL_SHAPES = ((9, 11), (5, 6), (3, 3), (2, 2))


def inputs() -> dict:
  rng = np.random.default_rng(1234)
  f32 = lambda x: np.asarray(x, np.float32)
  res = {"msda": {}, "window": {}}
  for tag, (levels, points, d) in MSDA_CASES.items():
    shapes = LEVEL_SHAPES[:levels]
    s = sum(h * w for h, w in shapes)
    b, lq, m = 2, 13, 2
    res["msda"][tag] = dict(
        shapes=shapes, value=f32(rng.standard_normal((b, s, m, d))),
        loc=f32(rng.uniform(-0.1, 1.1, (b, lq, m, levels, points, 2))),
        aw=f32(rng.uniform(0, 1, (b, lq, m, levels, points))),
        cot=f32(rng.standard_normal((b, lq, m * d))),
        ref=f32(rng.uniform(0, 1, (b, lq, levels, 4))),
        off=f32(rng.standard_normal((b, lq, m, levels, points, 2))),
        logits=f32(rng.standard_normal((b, lq, m, levels * points))))
  for ws, c, heads in WINDOW_CASES:
    n = ws * ws
    res["window"][ws] = dict(
        heads=heads, scale=(c // heads) ** -0.5,
        qkv=f32(rng.standard_normal((2, 3, n, 3 * c))),
        bias=f32(rng.standard_normal((heads, n, n))),
        mask=f32(np.where(rng.uniform(size=(3, n, n)) < 0.3, -100.0, 0.0)))
  res["mask_logits"] = f32(rng.standard_normal((5, 17, 23)) * 3)
  res["points"] = dict(
      maps=f32(rng.standard_normal((2, 6, 13, 17))),
      index=rng.integers(0, 6, (2, 5)).astype(np.int32),
      coords=f32(rng.uniform(-0.1, 1.1, (2, 5, 40, 2))),
      cot=f32(rng.standard_normal((2, 5, 40))),
      masks=np.packbits(rng.uniform(size=(2, 3, 26, 32)) < 0.5, axis=-1, bitorder="little"),
      seeds=rng.integers(0, 2**32, (2, 5), dtype=np.uint64).astype(np.uint32))
  return res


def outputs() -> dict[str, np.ndarray]:
  from semsam_jax.kernels import mask_stats, msda_cpu, point_sample, window_attention
  x = inputs()
  res = {}
  for tag, a in x["msda"].items():
    out, vjp = jax.vjp(lambda v, l, w: msda_cpu.msda_cpu(v, a["shapes"], l, w),
                       a["value"], a["loc"], a["aw"])
    res[f"msda_{tag}_out"] = np.asarray(out)
    for name, g in zip(("value", "loc", "aw"), vjp(jnp.asarray(a["cot"]))):
      res[f"msda_{tag}_grad_{name}"] = np.asarray(g)
    res[f"msda_{tag}_query"] = np.asarray(msda_cpu.msda_cpu_query_forward(
        a["value"], a["shapes"], a["ref"], a["off"], a["logits"]))
  for ws, a in x["window"].items():
    for kind, mask in (("plain", None), ("masked", a["mask"])):
      res[f"window_{ws}_{kind}"] = np.asarray(window_attention.window_attention(
          a["qkv"], a["bias"], mask, a["heads"], a["scale"]))
  res["mask_counts"] = np.asarray(mask_stats.mask_threshold_counts(
      x["mask_logits"], np.array([60, 85], np.int32), np.array([-1.0, 0.0, 1.0], np.float32), 4))
  pt = x["points"]
  out, vjp = jax.vjp(lambda m: point_sample.sample_maps(m, pt["index"], pt["coords"]),
                     pt["maps"])
  res["points_sample"] = np.asarray(out)
  res["points_sample_grad"] = np.asarray(vjp(jnp.asarray(pt["cot"]))[0])
  res["points_packed"] = np.asarray(point_sample.sample_packed_masks(
      pt["masks"], pt["index"] % 3, pt["coords"]))
  res["points_uncertain"] = np.asarray(point_sample.uncertain_points(
      pt["maps"], pt["index"], pt["seeds"], 90, 30, 10))
  return res


if __name__ == "__main__":
  from semsam_jax.kernels import native
  info = native.build_info()
  if info["isa"] is None:
    sys.exit(f"native kernels unavailable: {info.get('unavailable')}")
  np.savez(sys.argv[1], isa=np.array(info["isa"]), arch=np.array(info["arch"]), **outputs())
