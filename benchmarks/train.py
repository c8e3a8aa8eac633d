"""Train-step benchmark and ahead-of-time memory simulation.

    python benchmarks/train.py --case tiny [--batch 4] [--repeats 5]
    python benchmarks/train.py --case swint --batch 1 2        # SwinT 1024², reference loss sizes
    python benchmarks/train.py --memsim [--meshes 8x1 1x8 2x4] # SwinL 1024² on 8 fake CPU devices

Step rows: the jitted train step (forward + objective + backward + AdamW, the
state donated) on the synthetic data at the config's sizes, one device;
median of ``--repeats`` timed steps after one warm-up step (compile apart),
images/s, the XLA FLOP count of the step, the float32 matmul rate measured
around every timed step (``benchmarks/common.paired_runs``), floor = FLOPs /
rate, x floor, peak RSS. On a GPU/TPU the same rows print MFU against
``--peak-tflops``.

``--memsim`` lowers and compiles the SwinL 1024² step for abstract inputs
(global batch = devices x ``--per-device-batch``) under each mesh, with and
without remat (``--remat``: model.remat values, default none and
block+encoder_layer+decoder_layer) and bf16 compute, and prints per-device bytes of
arguments (params + optimizer state + batch), outputs, temporaries
(``compiled.memory_analysis()``) and the largest per-device batch that fits
``--device-gb`` assuming temporaries grow linearly with the batch.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--memsim" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from semsam_jax.training import loop, state as state_lib  # noqa: E402
from semsam_jax.training.config import complete_config  # noqa: E402

STEP_HEADERS = ["case", "batch", "median s", "img/s", "compile s", "XLA GFLOP",
                "matmul GFLOP/s", "floor s", "x floor", "peak RSS MiB"]


def case_config(case: str, batch: int):
  if case == "tiny":
    from configs import tiny
    c = tiny.get_config()
  elif case == "swint":
    from configs import swin_t
    c = swin_t.get_config()
    c.data.synthetic.image_size = 1024
    c.data.synthetic.num_train_images = 8
    c.data.synthetic.num_heldout_images = 2
  else:
    raise ValueError(case)
  c.batch_size = batch
  c.mesh.data, c.mesh.fsdp = 1, 1
  c.progress_bar = False
  return complete_config(c)


def step_row(case: str, batch: int, repeats: int, peak_tflops: float | None):
  from semsam_jax.data import make_train_loader
  config = case_config(case, batch)
  dev = jax.devices()[:1]
  mesh, tx, abstract, shardings, step_fn = loop.build(config, dev)
  state = loop.initial_state(config, tx, shardings, log=lambda m: None)
  it = iter(make_train_loader(config, process_index=0, process_count=1))
  batches = [next(it) for _ in range(repeats + 1)]
  bsh = state_lib.batch_shardings(mesh, state_lib.rules_of(config), batches[0])
  jitted = loop.jit_step(step_fn, shardings, bsh, mesh)
  lr = np.float32(config.optim.base_lr)
  gbs = [state_lib.global_batch(b, bsh, batch) for b in batches]
  compiled, compile_s, flops = common.time_compile(jitted, state, gbs[0], lr)
  holder = {"state": state, "i": 0}

  def call():
    s, m = compiled(holder["state"], gbs[holder["i"] % len(gbs)], lr)
    common.block(m)
    holder["state"] = s
    holder["i"] += 1

  r = common.paired_runs(call, repeats)
  ratios = [t * rt / flops for t, rt in zip(r["times"], r["rates"])] if flops else None
  floor = flops / r["rate"] if flops else None
  row = [case, batch, r["median"], batch / r["median"], compile_s,
         flops / 1e9 if flops else None, r["rate"] / 1e9, floor,
         float(np.median(ratios)) if ratios else None, common.peak_rss_mb()]
  if peak_tflops and flops:
    row.append(f"MFU {flops / r['median'] / (peak_tflops * 1e12):.1%}")
  return row


def memsim(meshes, per_device_batch: int, device_gb: float, remats):
  from configs import swin_l
  from semsam_jax.models import semantic_sam as ss  # noqa: F401
  rows = []
  for mesh_s in meshes:
    d, f = (int(x) for x in mesh_s.split("x"))
    for remat in remats:
      for dtype in ("float32", "bfloat16"):
        c = swin_l.get_config()
        c.mesh.data, c.mesh.fsdp = d, f
        c.batch_size = d * f * per_device_batch
        c.model.remat = remat
        c.model.dtype = dtype
        c = complete_config(c)
        mesh, tx, abstract, shardings, step_fn = loop.build(c, jax.devices()[:d * f])
        S, M, K = c.data.image_size, c.data.max_masks_per_image, c.data.max_num_instance
        T = c.model.decoder.num_mask_tokens
        B = c.batch_size
        spec = {"image": ((B, S, S, 3), np.uint8), "image_size": ((B, 2), np.int32),
                "masks": ((B, M, S, S // 8), np.uint8), "mask_valid": ((B, M), bool),
                "mask_boxes": ((B, M, 4), np.float32), "click_xy": ((B, K, 2), np.int32),
                "prompt_mask": ((B, K), np.int32), "prompt_valid": ((B, K), bool),
                "target_index": ((B, K, T), np.int32), "target_valid": ((B, K, T), bool),
                "example_id": ((B,), np.int32), "num_dropped_prompts": ((B,), np.int32)}
        batch = {k: jax.ShapeDtypeStruct(s, t) for k, (s, t) in spec.items()}
        bsh = state_lib.batch_shardings(mesh, state_lib.rules_of(c), batch)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh[k])
                 for k, v in batch.items()}
        st = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          abstract, shardings)
        jitted = loop.jit_step(step_fn, shardings, bsh, mesh)
        compiled, secs, _ = common.time_compile(jitted, st, batch, np.float32(1e-4))
        ma = compiled.memory_analysis()
        gib = 2.0 ** 30
        state_bytes = sum(
            int(np.prod(s.shape)) * s.dtype.itemsize // max(1, np.prod(
                [mesh.shape[a] for a in jax.tree.leaves(tuple(sh.spec)) if a]))
            for s, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))
        temp = ma.temp_size_in_bytes
        fixed = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
        fit = int((device_gb * 1e9 - state_bytes * 2) // max(temp / per_device_batch, 1))
        rows.append([mesh_s, remat, dtype, state_bytes / gib, ma.argument_size_in_bytes / gib,
                     ma.output_size_in_bytes / gib, temp / gib, fixed / gib, secs, fit])
        print(rows[-1], flush=True)
  common.print_table(["mesh", "remat", "compute", "state GiB/dev", "args GiB", "out GiB",
                      "temp GiB", "args+out-alias GiB", "compile s",
                      f"max batch/dev ({device_gb:g} GB)"], rows)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--case", choices=("tiny", "swint"), default="tiny")
  ap.add_argument("--batch", type=int, nargs="+", default=None)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--peak-tflops", type=float, default=None,
                  help="accelerator peak (TFLOP/s) for the MFU column")
  ap.add_argument("--memsim", action="store_true")
  ap.add_argument("--meshes", nargs="+", default=["8x1", "1x8", "2x4"])
  ap.add_argument("--per-device-batch", type=int, default=1)
  ap.add_argument("--remat", nargs="+", default=["none", "block+encoder_layer+decoder_layer"],
                  help="model.remat values to compare (semsam_jax.config.REMAT_GRANULARITIES)")
  ap.add_argument("--device-gb", type=float, default=80.0)
  args = ap.parse_args()
  print(common.machine_line())
  print(f"load average: {os.getloadavg()}")
  if args.memsim:
    memsim(args.meshes, args.per_device_batch, args.device_gb, args.remat)
    return
  batches = args.batch or ([4] if args.case == "tiny" else [1, 2])
  rows = [step_row(args.case, b, args.repeats, args.peak_tflops) for b in batches]
  common.print_table(STEP_HEADERS + (["MFU"] if args.peak_tflops else []), rows)


if __name__ == "__main__":
  main()
