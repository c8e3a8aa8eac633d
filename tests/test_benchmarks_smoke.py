"""The benchmark scripts run (tiny shapes), so they never rot. Timings are not checked."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["msda.py", "inference.py"])
def test_benchmark_script_runs(script):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--small",
                      "--repeats", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [l for l in r.stdout.splitlines() if l.startswith("|")]
  assert len(lines) >= 4, r.stdout          # header, rule and rows
  assert "median s" in lines[0]


def test_bf16_accuracy_script_runs():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bf16_accuracy.py"),
                      "--skip-full", "--max-cases", "1"], capture_output=True, text=True,
                     timeout=600, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [l for l in r.stdout.splitlines() if l.startswith("| tiny")]
  assert [row.split("|")[2].strip() for row in rows] == ["float32", "bfloat16"], r.stdout
  # float32 reproduces PyTorch; bfloat16 drifts (a sanity check of the script,
  # with the parity limit of the golden tests).
  f32_err = float(rows[0].split("|")[3])
  assert f32_err <= 1e-5


def test_profile_script_runs():
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "profile_ops.py"),
                      "--small", "--runs", "1"], capture_output=True, text=True, timeout=600,
                     cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [l for l in r.stdout.splitlines() if l.startswith("|")]
  assert "model part / primitive" in lines[0], r.stdout
  # the profile attributes the time to model parts, matrix products among them
  assert any("backbone" in l and "dot_general" in l for l in lines), r.stdout
  assert any(l.startswith("| dot_general ") for l in lines), r.stdout


def test_data_benchmark_runs(tmp_path):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "data.py"), "--small",
                      "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                     cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = [l for l in r.stdout.splitlines() if l.startswith("|")]
  assert "images/s per core" in lines[0] and len(lines) == 3, r.stdout
  assert "masks per image mean" in r.stdout and "in-process breakdown" in r.stdout
