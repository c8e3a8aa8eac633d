"""Metric sinks of a run (process 0 only): JSON lines, TensorBoard, a progress bar."""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"


def _plain(v):
  if isinstance(v, (bool, int, str)) or v is None:
    return v
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  v = float(v)
  return v if math.isfinite(v) else str(v)


class MetricWriter:
  """Writes one record per logged step to ``WORKDIR/metrics.jsonl`` and TensorBoard."""

  def __init__(self, workdir, *, enabled: bool, resume_step: int = 0,
               progress_total: int | None = None, progress_initial: int = 0,
               progress_bar: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / METRICS_FILE
    self._tb = None
    self._bar = None
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      self._truncate_after(resume_step)
    self._f = open(self.path, "a", encoding="utf-8")
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(str(pathlib.Path(workdir) / TB_DIR), purge_step=resume_step or None)
    if progress_bar:
      from tqdm import tqdm
      self._bar = tqdm(total=progress_total, initial=progress_initial, unit="step",
                       dynamic_ncols=True, file=sys.stderr)

  def _truncate_after(self, step: int):
    """Drops records of steps after ``step`` (written after the checkpoint resumed from)."""
    keep = []
    with open(self.path, encoding="utf-8") as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue  # a line cut by a crash
        if int(rec.get("step", 0)) <= step:
          keep.append(json.dumps(rec))
    tmp = self.path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, self.path)

  def write(self, step: int, scalars: dict, *, event: str | None = None):
    if not self.enabled:
      return
    rec = {"step": int(step)}
    if event:
      rec["event"] = event
    rec.update({k: _plain(v) for k, v in scalars.items()})
    self._f.write(json.dumps(rec) + "\n")
    self._f.flush()
    for k, v in scalars.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
        self._tb.add_scalar(k, float(v), int(step))

  def progress(self, n: int = 1, **postfix):
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                               for k, v in postfix.items()}, refresh=False)

  def message(self, text: str):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr, flush=True)

  def close(self):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    self._tb.flush()
    self._tb.close()
    self._f.close()
