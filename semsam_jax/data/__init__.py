"""Training data: SA-1B-format TFDS datasets and the grain input pipeline.

- ``python -m semsam_jax.data {build-sa1b,build-coco,build-masks,synth,show}``
  (see ``docs/data.md``).
- :func:`ensure_dataset` -- the data dir to read (generates the default
  synthetic dataset when ``config.data.data_dir`` is None).
- :func:`make_train_loader` -- per-host static-shape training batches
  (``docs/training.md``).
- :func:`read_split` -- decoded examples for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile

from semsam_jax.data.config import data_config, default_cache_dir
from semsam_jax.data.pipeline import make_train_loader, read_split, prepare_example

__all__ = ["data_config", "ensure_dataset", "make_train_loader", "read_split",
           "prepare_example", "synthetic_dir"]


def synthetic_generator_args(synthetic_cfg) -> dict:
  """Keyword arguments of ``synthetic.generate`` from ``config.data.synthetic``
  (its ``objects_per_image``, ``max_parts`` and shape knobs), checked."""
  from semsam_jax.data import synthetic
  s = synthetic_cfg
  lo, hi = (int(x) for x in s.objects_per_image)
  if not 1 <= lo <= hi:
    raise ValueError(f"data.synthetic.objects_per_image must be 1 <= min <= max, "
                     f"got {tuple(s.objects_per_image)}")
  if int(s.max_parts) < 1:
    raise ValueError(f"data.synthetic.max_parts must be >= 1, got {s.max_parts}")
  knobs = synthetic.shape_knobs(**{k: s[k] for k in synthetic.DEFAULT_KNOBS})
  return dict(objects_per_image=(lo, hi), max_parts=int(s.max_parts), **knobs)


def synthetic_dir(data_cfg) -> str:
  """Cache folder of the synthetic dataset described by ``data_cfg.synthetic``
  (every field that changes the generated images is part of the key)."""
  s = data_cfg.synthetic
  gen = {k: list(v) if isinstance(v, tuple) else v
         for k, v in synthetic_generator_args(s).items()}
  params = dict(version=2, train=[int(s.num_train_images), int(s.train_seed)],
                heldout=[int(s.num_heldout_images), int(s.heldout_seed)],
                image_size=int(s.image_size), train_split=data_cfg.train_split,
                eval_split=data_cfg.eval_split, generator=gen)
  key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
  cache = s.cache_dir or default_cache_dir()
  return os.path.join(cache, f"synthetic-{s.image_size}px-{s.num_train_images}-{key}")


def ensure_dataset(data_cfg, progress: bool = True) -> str:
  """The data dir to read: ``data_cfg.data_dir``, or the synthetic dataset.

  With ``data_dir`` None, the synthetic train split (``synthetic.train_seed``)
  and held-out split (``synthetic.heldout_seed``) are generated and built once
  into a cache folder (``synthetic.cache_dir``, default ``$SEMSAM_DATA_CACHE``
  or ``~/.cache/semsam_jax/data``); later calls (and other processes, which
  wait on a file lock) reuse it.  The folder appears atomically when complete.
  """
  if data_cfg.data_dir:
    return str(data_cfg.data_dir)
  import fcntl
  from semsam_jax.data import sa1b, synthetic
  out = synthetic_dir(data_cfg)
  done = os.path.join(out, "COMPLETE")
  if os.path.exists(done):
    return out
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(done):
      return out
    s = data_cfg.synthetic
    print(f"semsam_jax.data: generating the synthetic dataset into {out}", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    try:
      for split, num, seed, offset in (
          (data_cfg.train_split, s.num_train_images, s.train_seed, 0),
          (data_cfg.eval_split, s.num_heldout_images, s.heldout_seed, 10_000_000)):
        src = os.path.join(tmp, "sources", split)
        synthetic.generate(src, int(num), int(seed), int(s.image_size),
                           image_id_offset=offset, progress=progress,
                           **synthetic_generator_args(s))
        report = sa1b.build([src], tmp, split=split, progress=progress,
                            log=lambda m: print(m, file=sys.stderr))
        print(f"semsam_jax.data: {split}: {report.summary()}", file=sys.stderr)
      with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write("ok\n")
      shutil.rmtree(out, ignore_errors=True)
      os.replace(tmp, out)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
  return out
