"""Picture of one training example after augmentation (``show`` command)."""

from __future__ import annotations

import numpy as np

from semsam_jax.data import pipeline as P


def _unpack(masks: np.ndarray) -> np.ndarray:
  return np.unpackbits(masks, axis=-1, bitorder="little").astype(bool)


def render_example(ex: dict, num_clicks: int = 4, title: str = "", seed: int = 0,
                   valid_hw: tuple[int, int] | None = None):
  """A matplotlib figure: image, all masks, and ``num_clicks`` clicks with their targets.

  ``valid_hw``: the canvas part covered by the image; clicks there are drawn
  first (a click in the crop's pad has every mask as a target when
  ``mask_pad_value`` is 255, which shows no nesting).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rng = np.random.default_rng(seed)
  image = ex["image"]
  valid = np.flatnonzero(ex["mask_valid"])
  masks = _unpack(ex["masks"][valid])
  colors = rng.uniform(0.15, 1.0, size=(max(len(valid), 1), 3))
  prompts = np.flatnonzero(ex["prompt_valid"])
  # Prefer clicks with many levels, so that the nesting is visible.
  depth = ex["target_valid"][prompts].sum(-1).astype(np.int64)
  if valid_hw is not None:
    x, y = ex["click_xy"][prompts, 0], ex["click_xy"][prompts, 1]
    depth += 100 * ((x < valid_hw[1]) & (y < valid_hw[0]))
  order = prompts[np.argsort(-depth, kind="stable")]
  picked = []
  for k in order:  # distinct prompt masks
    if all(ex["prompt_mask"][k] != ex["prompt_mask"][j] for j in picked):
      picked.append(k)
    if len(picked) == num_clicks:
      break
  cols = max(2, len(picked))
  fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.8), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  axes[0, 0].imshow(image)
  axes[0, 0].set_title("augmented image")
  over = image.astype(np.float32) / 255 * 0.35
  # Larger masks first, so that small ones stay visible on top.
  for i in np.argsort(-masks.reshape(len(masks), -1).sum(1)) if len(masks) else []:
    over[masks[i]] = 0.45 * over[masks[i]] + 0.55 * colors[i]
  axes[0, 1].imshow(over)
  axes[0, 1].set_title(f"{len(valid)} shipped masks")
  for i in range(len(valid)):
    x0, y0, x1, y1 = ex["mask_boxes"][valid[i]]
    axes[0, 1].add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       lw=0.5, ec=colors[i]))
  if cols > 2:
    ax = axes[0, 2]
    ax.imshow(image)
    d = ex["target_valid"][prompts].sum(-1)
    sc = ax.scatter(ex["click_xy"][prompts, 0], ex["click_xy"][prompts, 1], c=d, s=14,
                    cmap="plasma", vmin=1, vmax=ex["target_valid"].shape[-1], edgecolors="white",
                    linewidths=0.4)
    fig.colorbar(sc, ax=ax, fraction=0.046, label="level targets")
    ax.set_title(f"{len(prompts)} clicks")
  for c, k in enumerate(picked):
    ax = axes[1, c]
    tv = np.flatnonzero(ex["target_valid"][k])
    slots = ex["target_index"][k][tv]
    area = [masks[s].sum() for s in slots]
    canvas = image.astype(np.float32) / 255 * 0.45
    palette = plt.get_cmap("tab10")
    for rank, j in enumerate(np.argsort(area)[::-1]):  # largest first, finest on top
      col = np.array(palette(rank % 10)[:3])
      m = masks[slots[j]]
      canvas[m] = 0.35 * canvas[m] + 0.65 * col
    ax.imshow(canvas)
    for rank, j in enumerate(np.argsort(area)[::-1]):
      ax.contour(masks[slots[j]].astype(np.float32), levels=[0.5], colors=[palette(rank % 10)],
                 linewidths=1.0)
    x, y = ex["click_xy"][k]
    ax.plot([x], [y], marker="*", ms=14, mec="white", mfc="red")
    ax.set_title(f"click {k}: {len(slots)} level target(s)\nareas " +
                 ", ".join(str(int(a)) for a in sorted(area, reverse=True)), fontsize=9)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def show(data_dir: str, index: int, output: str, *, split: str = "train", seed: int = 0,
         epoch: int = 0, image_size: int | None = None, num_clicks: int = 4,
         mask_pad_value: int = 255, max_num_instance: int = 60, num_tokens: int = 6,
         dpi: int = 110):
  """Draws example ``index`` of ``split`` as the training pipeline produces it."""
  import os
  import tempfile

  src = P.raw_source(data_dir, split)
  if not 0 <= index < len(src):
    raise IndexError(f"--index {index}: {split} has {len(src)} examples")
  raw = src[index]
  from semsam_jax.data import transforms as T
  image = T.decode_image(raw["image"]["content"])
  size = int(image_size or 1024)
  opt = P.ExampleOptions(image_size=size, mask_pad_value=mask_pad_value,
                         max_num_instance=max_num_instance, num_tokens=num_tokens)
  rng = np.random.default_rng([seed, index, epoch])
  ex, dbg = P.prepare_example(image, P._rles(raw), rng, opt, example_id=index,
                              return_debug=True)
  g = dbg["geometry"]
  fn = raw["image"]["file_name"]
  fn = fn.decode() if isinstance(fn, bytes) else str(fn)
  fig = render_example(ex, num_clicks=num_clicks, valid_hw=(g.valid_h, g.valid_w),
                       title=f"{fn} ({split}[{index}], seed {seed}, epoch {epoch}, "
                             f"canvas {size}x{size}, {len(raw['annotations']['id'])} masks in the source)")
  d = os.path.dirname(os.path.abspath(output))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".png", dir=d)
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, output)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return ex
