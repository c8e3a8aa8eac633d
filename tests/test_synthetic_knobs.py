"""The synthetic generator's shape knobs (config.data.synthetic) and the cache key."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from semsam_jax.data import data_config, synthetic, synthetic_dir, synthetic_generator_args


def _digest(**knobs) -> str:
  h = hashlib.sha1()
  for i in range(3):
    image, regions = synthetic.render(3, i, 64, **knobs)
    h.update(image.tobytes())
    for name, m in regions:
      h.update(name.encode())
      h.update(np.packbits(m).tobytes())
  return h.hexdigest()


def test_default_knobs_reproduce_the_generator_before_the_knobs():
  # sha1 of render(3, 0..2, 64) recorded with the generator of commit 69ee357,
  # which had the current defaults hard-coded.
  want = "d035ad94b7b60b8d29f4db371494be82ff876354"
  assert _digest() == want
  assert _digest(**synthetic.DEFAULT_KNOBS) == want


def test_knobs_change_the_masks():
  kw = dict(object_radius=(0.25, 0.3), subparts_per_part=(0, 0), detail_prob=0.0, min_area=50)
  areas, names = [], []
  for i in range(6):
    _, regions = synthetic.render(1, i, 64, (1, 2), 3, **kw)
    areas += [int(m.sum()) for _, m in regions]
    names += [n for n, _ in regions]
  assert min(areas) >= 50
  assert not any("/sub" in n for n in names)           # no sub-parts, hence no details
  # Object radius: (0.25, 0.3) x 64 px against (0.06, 0.1) x 64 px, one object per image.
  def mean_object_area(radius):
    a = [int(m.sum()) for i in range(8)
         for n, m in synthetic.render(2, i, 64, (1, 1), 1, object_radius=radius)[1]
         if n == "object0"]
    return float(np.mean(a))
  big, small = mean_object_area((0.25, 0.3)), mean_object_area((0.06, 0.1))
  assert big > 6 * small, (big, small)      # radius ratio ~3.4: area ratio ~11 before clipping
  with pytest.raises(ValueError, match="unknown synthetic shape knob"):
    synthetic.render(0, 0, 32, radius=(0.1, 0.2))
  with pytest.raises(ValueError, match="object_radius"):
    synthetic.render(0, 0, 32, object_radius=(0.3, 0.1))
  with pytest.raises(ValueError, match="min_area"):
    synthetic.render(0, 0, 32, min_area=0)


def test_every_generator_knob_is_part_of_the_cache_key(tmp_path):
  base = data_config()
  base.synthetic.cache_dir = str(tmp_path)
  dirs = {synthetic_dir(base)}
  changes = dict(objects_per_image=(1, 3), max_parts=2, object_radius=(0.1, 0.2),
                 subpart_radius=(0.2, 0.4), subparts_per_part=(0, 1), detail_prob=0.1,
                 min_area=16)
  assert set(changes) == set(synthetic.DEFAULT_KNOBS) | {"objects_per_image", "max_parts"}
  for k, v in changes.items():
    c = data_config()
    c.synthetic.cache_dir = str(tmp_path)
    c.synthetic[k] = v
    dirs.add(synthetic_dir(c))
    assert synthetic_generator_args(c.synthetic)[k] == v
  assert len(dirs) == 1 + len(changes)
  c = data_config()
  c.synthetic.objects_per_image = (4, 2)
  with pytest.raises(ValueError, match="objects_per_image"):
    synthetic_dir(c)
