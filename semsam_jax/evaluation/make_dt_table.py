"""Developer tool (needs PyTorch; never imported at runtime): regenerates
``KORNIA_STEP_TABLE`` in :mod:`semsam_jax.evaluation.clicks`.

The cascaded-convolution distance transform that the original evaluation uses
(kornia's ``distance_transform``, kernel 3, h = 0.35) gives every pixel the
value ``i + c`` when it is reached in step ``i``, where ``c = -h * log(S)`` and
``S`` is the 3x3 convolution of the current boundary indicator with the kernel
``exp(-|offset| / h)``.  ``S`` only depends on which of the 8 neighbours are
already boundary, so ``c`` takes one of 255 float32 values.  numpy's float32
``log`` is correctly rounded but PyTorch's CPU ``log`` is not always, so the
values PyTorch produces are recorded here once (run in a separate venv with
torch installed)::

    /tmp/torchenv/bin/python -m semsam_jax.evaluation.make_dt_table

prints the table literal to paste into ``clicks.py``.  The tests check the
table against the golden distance maps of the original.
"""

from __future__ import annotations

import numpy as np


def main() -> None:
  import torch  # dev-only
  import torch.nn.functional as F
  h = 0.35
  g = torch.arange(3, dtype=torch.float32) - 1
  yy, xx = torch.meshgrid(g, g, indexing="ij")
  kernel = torch.exp(torch.hypot(xx, yy) / -h)[None, None]
  # Neighbour j of the 8 (row-major, centre skipped) sets bit j of the code.
  offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
  image = torch.ones(1, 1, 5, 5 * 256)
  for code in range(256):
    tile = torch.zeros(3, 3)
    for j, (dy, dx) in enumerate(offsets):
      tile[1 + dy, 1 + dx] = float((code >> j) & 1)
    image[0, 0, 1:4, 5 * code + 1:5 * code + 4] = tile
  s = F.conv2d(F.pad(image, (1, 1, 1, 1), mode="replicate"), kernel)
  c = torch.nan_to_num(-h * torch.log(s), posinf=0.0)
  values = [float(c[0, 0, 2, 5 * code + 2]) for code in range(256)]
  bits = np.asarray(values, np.float32).view(np.uint32)
  print("KORNIA_STEP_TABLE_BITS = (")
  for row in range(0, 256, 8):
    print("    " + ", ".join(f"0x{int(b):08x}" for b in bits[row:row + 8]) + ",")
  print(")")


if __name__ == "__main__":
  main()
