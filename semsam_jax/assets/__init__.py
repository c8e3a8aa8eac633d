"""Files shipped inside the package.

``tiny/``: the committed ``configs/tiny.py`` model trained on the embedded
synthetic data (an orbax params export, ``training.checkpoint.export_params``
layout; how it was made and what it measures: ``docs/demo.md``).  It is the
model ``eval.py``, ``python -m semsam_jax predict`` and ``auto`` use when no
checkpoint is given.
"""

from __future__ import annotations

import os

TINY_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")


def default_checkpoint() -> str:
  """Directory of the committed tiny checkpoint; an error when it is missing
  (e.g. a source tree without the package data)."""
  if not os.path.isfile(os.path.join(TINY_CHECKPOINT, "config.json")):
    raise FileNotFoundError(
        f"the committed tiny checkpoint is missing ({TINY_CHECKPOINT}/config.json not found); "
        "pass a checkpoint explicitly")
  return TINY_CHECKPOINT
