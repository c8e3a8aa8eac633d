"""Cost of the training objective (matching + point sampling + losses) as a
share of a whole training step (forward + backward of model and objective).

    python benchmarks/objective.py [--backbone swin_t] [--size 1024] [--prompts 60]
                                   [--masks 40] [--points 12544] [--repeats 3] [--small]

Random parameters of the released architecture, one synthetic image of
``--size``² with ``--masks`` nested / overlapping masks, ``--prompts`` clicks
(T = 6 level targets at most), drop-path active, batch 1 (the reference's
per-device batch).  Rows:

* ``train step``: ``jax.value_and_grad`` of ``make_loss_fn(config)`` w.r.t.
  the parameters (what the training loop runs, without the optimiser);
* ``objective``: the same objective with the decoder outputs as *inputs*
  (``forward=`` stage replaced), gradient w.r.t. those outputs: matching on
  the last layer, uncertainty point sampling on every layer, the five terms,
  and their backward pass.

Median wall seconds after one warm-up, compile apart; the 1-minute load
average before and after the run (the machine may be shared: a load above the
core count means slower, less reliable numbers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from semsam_jax.config import model_config  # noqa: E402
from semsam_jax.losses import loss_config, make_loss_fn, make_objective  # noqa: E402
from semsam_jax.models import semantic_sam as ss  # noqa: E402


def synthetic_batch(size: int, num_masks: int, num_prompts: int, t: int, seed: int = 0):
  """One image in the docs/training.md layout: ellipses of random size (many
  nested), clicks as the reference draws them, level targets = every mask at
  the click (cut to ``t``)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((num_masks, size, size), bool)
  for m in range(num_masks):
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    rx, ry = rng.uniform(0.03, 0.4, 2) * size
    masks[m] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
  boxes = np.zeros((num_masks, 4), np.float32)
  for m in range(num_masks):
    ys, xs = np.nonzero(masks[m])
    boxes[m] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
  order = np.tile(rng.permutation(num_masks), num_prompts // num_masks + 1)[:num_prompts]
  click = np.zeros((num_prompts, 2), np.int32)
  index = np.zeros((num_prompts, t), np.int32)
  valid = np.zeros((num_prompts, t), bool)
  for i, m in enumerate(order):
    ys, xs = np.nonzero(masks[m])
    j = rng.integers(len(ys))
    click[i] = [xs[j], ys[j]]
    tg = np.nonzero(masks[:, ys[j], xs[j]])[0]
    tg = rng.permutation(tg)[:t] if len(tg) > t else tg
    index[i, :len(tg)] = tg
    valid[i, :len(tg)] = True
  return {
      "image": rng.integers(0, 256, (1, size, size, 3)).astype(np.uint8),
      "image_size": np.asarray([[size, size]], np.int32),
      "masks": np.packbits(masks, axis=-1, bitorder="little")[None],
      "mask_valid": np.ones((1, num_masks), bool), "mask_boxes": boxes[None],
      "click_xy": click[None], "prompt_mask": order.astype(np.int32)[None],
      "prompt_valid": np.ones((1, num_prompts), bool), "target_index": index[None],
      "target_valid": valid[None], "example_id": np.zeros((1,), np.int32),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--backbone", default="swin_t", choices=["swin_t", "swin_l"])
  p.add_argument("--size", type=int, default=1024)
  p.add_argument("--prompts", type=int, default=60)
  p.add_argument("--masks", type=int, default=40)
  p.add_argument("--points", type=int, default=12544)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--small", action="store_true",
                 help="tiny model, 128² image, 4 prompts, 256 points (a smoke run)")
  a = p.parse_args(argv)
  model = model_config(a.backbone)
  if a.small:
    a.size, a.prompts, a.masks, a.points = 128, 4, 5, 256
    model.backbone.update(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
    model.pixel_decoder.update(conv_dim=64, mask_dim=32, dim_feedforward=64,
                               num_encoder_layers=1, num_heads=4)
    model.decoder.update(hidden_dim=32, mask_dim=32, dim_feedforward=64, num_layers=2,
                         num_heads=4, dim_proj=32)
  loss = loss_config()
  loss.train_num_points = a.points
  config = ml_collections.ConfigDict({"model": model, "loss": loss})
  t = int(model.decoder.num_mask_tokens)
  load0 = os.getloadavg()[0]
  print(common.machine_line())
  print(f"cores {os.cpu_count()} | load average (1 min) before: {load0:.2f}")
  batch = synthetic_batch(a.size, a.masks, a.prompts, t)
  n_targets = int(batch["target_valid"].sum())
  params = ss.init_params(model, jax.random.PRNGKey(0))
  key = jax.random.PRNGKey(1)

  loss_fn = make_loss_fn(config)
  step = jax.jit(jax.value_and_grad(lambda p_, b, k: loss_fn(p_, b, k)[0]))

  # Decoder outputs of one real forward, then fed in as inputs.
  objective = make_objective(config)
  _, details = jax.jit(lambda p_, b, k: objective(p_, b, k))(params, batch, key)
  outputs = jax.tree.map(lambda x: jnp.asarray(x), details["layers"])
  del details
  only = make_objective(config, forward=lambda model_, outs, *args: outs)
  obj = jax.jit(jax.value_and_grad(lambda o, b, k: only(o, b, k)[0]))

  rows = []
  results = {}
  for name, fn, arg in (("train step", step, params), ("objective", obj, outputs)):
    compiled, secs, _ = common.time_compile(fn, arg, batch, key)
    r = common.time_fn(compiled, arg, batch, key, warmup=1, runs=a.repeats)
    results[name] = r["median"]
    rows.append([name, r["median"], r["min"], secs])
  share = results["objective"] / results["train step"]
  load1 = os.getloadavg()[0]
  print(f"{a.backbone} {a.size}² | K={a.prompts} prompts, T={t}, {a.masks} masks, "
        f"{n_targets} level targets | P={a.points} points | "
        f"{len(outputs)} decoder layers | batch 1 | repeats {a.repeats}")
  common.print_table(["part", "median s", "min s", "compile s"], rows)
  print(f"objective share of the step: {100 * share:.1f} %")
  print(f"load average (1 min) after: {load1:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
