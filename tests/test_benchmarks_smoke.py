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
