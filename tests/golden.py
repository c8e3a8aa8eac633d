"""Discovery of the golden reference data (outputs of the original PyTorch model).

The folder comes from ``$SEMSAM_GOLDEN_DIR`` (default ``../shared/golden`` relative
to the repository root).  Every ``tiny_*/`` model folder and every ``case_*.npz`` /
``msda_*.npz`` inside it is discovered, so new cases need no code change.  When the
``CI`` environment variable is set, a missing folder is a test failure, not a skip.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def golden_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SEMSAM_GOLDEN_DIR",
                                     REPO_ROOT.parent / "shared" / "golden"))


def _missing(what: str):
  msg = f"golden reference data not found: {what} (set SEMSAM_GOLDEN_DIR)"
  if os.environ.get("CI"):
    pytest.fail(msg)
  pytest.skip(msg)


def require_golden() -> pathlib.Path:
  d = golden_dir()
  if not d.is_dir():
    _missing(str(d))
  return d


def model_dirs() -> list[pathlib.Path]:
  d = golden_dir()
  return sorted(p for p in d.glob("tiny_*") if p.is_dir()) if d.is_dir() else []


def case_files(pattern: str = "case_*.npz") -> list[pathlib.Path]:
  return sorted(f for m in model_dirs() for f in m.glob(pattern))


def train_grad_files() -> list[pathlib.Path]:
  """Every ``train_*/ex*_grads.npz`` (gradients of one original training step)."""
  d = golden_dir()
  return sorted(d.glob("train_*/*_grads.npz")) if d.is_dir() else []


def model_dir_of(case_dir: pathlib.Path) -> pathlib.Path:
  """The ``tiny_*`` model folder a ``train_*`` / ``eval_*`` folder's meta.json names."""
  import json
  meta = json.loads((case_dir / "meta.json").read_text())
  return (case_dir / meta["model_dir"]).resolve()


def param_ids(paths) -> list[str]:
  return [f"{p.parent.name}/{p.stem}" for p in paths]


def cases_or_missing(pattern: str = "case_*.npz"):
  """Parametrization values; an empty list becomes one marker that fails/skips."""
  files = case_files(pattern)
  return files if files else [None]


def load_npz(path) -> dict[str, np.ndarray]:
  if path is None:
    _missing(f"{golden_dir()}/tiny_*/ files")
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def rel_l2(actual, expected) -> float:
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  denom = np.linalg.norm(expected.ravel())
  return float(np.linalg.norm((actual - expected).ravel()) / max(denom, 1e-30))


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))
