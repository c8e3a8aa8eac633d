"""SA-1B folders (``sa_N.jpg`` + ``sa_N.json``) -> the TFDS dataset."""

from __future__ import annotations

import json
import os
from typing import Sequence

from semsam_jax.data import builder as B


def scan_folder(source: str):
  """Pairs ``<stem>.jpg`` with ``<stem>.json``; returns (pairs, unpaired Skipped)."""
  if not os.path.isdir(source):
    raise FileNotFoundError(f"{source}: not a folder")
  names = sorted(os.listdir(source))
  images = {os.path.splitext(n)[0]: n for n in names
            if os.path.splitext(n)[1].lower() in (".jpg", ".jpeg")}
  jsons = {os.path.splitext(n)[0]: n for n in names if n.lower().endswith(".json")}
  pairs, skipped = [], []
  for stem in sorted(set(images) | set(jsons), key=_natural):
    if stem not in jsons:
      skipped.append(B.Skipped(os.path.join(source, images[stem]), "image without JSON"))
    elif stem not in images:
      skipped.append(B.Skipped(os.path.join(source, jsons[stem]), "JSON without image"))
    else:
      pairs.append((os.path.join(source, images[stem]), os.path.join(source, jsons[stem])))
  return pairs, skipped


def _natural(stem: str):
  digits = "".join(c for c in stem if c.isdigit())
  return (int(digits) if digits else -1, stem)


def load_pair(item):
  """(jpg, json) -> (key, example) or Skipped (runs in worker processes)."""
  image_path, json_path = item
  read = B.read_image_file(image_path)
  if isinstance(read, B.Skipped):
    return read
  data, h, w = read
  try:
    with open(json_path) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    return B.Skipped(json_path, f"JSON does not parse ({e})")
  try:
    info = record["image"]
    anns = record["annotations"]
    if not isinstance(anns, list):
      raise ValueError("'annotations' is not a list")
    jh, jw = int(info.get("height", h)), int(info.get("width", w))
    if (jh, jw) != (h, w):
      return B.Skipped(json_path, f"JSON image size {jh}x{jw} != image file {h}x{w}")
    B.check_rles(anns, h, w)
    image_id = int(info.get("image_id", 0))
    file_name = str(info.get("file_name", os.path.basename(image_path)))
    example = B.make_example(data, file_name, image_id, h, w, anns)
  except (KeyError, TypeError, ValueError) as e:
    return B.Skipped(json_path, f"bad annotations: {e}")
  return os.path.abspath(image_path), example


def build(sources: Sequence[str], data_dir: str, *, split: str = "train",
          num_workers: int = 1, progress: bool = True, log=print) -> B.BuildReport:
  """Builds SA-1B folders into ``data_dir`` (one part per folder, then assembly)."""
  report = B.BuildReport()
  os.makedirs(data_dir, exist_ok=True)
  for source in sources:
    pairs, unpaired = scan_folder(source)
    key = B.part_key(source, split, "sa1b")
    # Unpaired files are reported every time (they are not in the part).
    for s in unpaired:
      log(f"skip {s.path}: {s.reason}")
    built_now, n, skipped = B.build_part(data_dir, split, key, source, pairs, load_pair,
                                         num_workers=num_workers, progress=progress, log=log)
    if not built_now:
      for s in skipped:
        log(f"skip {s.path}: {s.reason} (reported when the part was built)")
    report.built += n
    report.skipped += unpaired + skipped
    report.parts_built += int(built_now)
    report.parts_reused += int(not built_now)
  B.assemble(data_dir, log=log)
  return report
