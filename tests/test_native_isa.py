"""The native kernels built for AVX2 + FMA (``x86-64-v3``) and for the
machine itself (``native``, AVX-512 where present) give bit-identical results
(the kernels use no FMA contraction and the same lane order everywhere), and
both agree with the pure-XLA formulations."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from semsam_jax.kernels import native
from tests.golden import REPO_ROOT

SCRIPT = REPO_ROOT / "tests" / "native_isa_outputs.py"


def _cpu_flags() -> set[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def _run(tmp_path, arch: str) -> dict[str, np.ndarray]:
  out = tmp_path / f"{arch}.npz"
  env = dict(os.environ, SEMSAM_JAX_NATIVE_ARCH=arch, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  res = subprocess.run([sys.executable, str(SCRIPT), str(out)], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  with np.load(out) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
  if platform.machine() not in ("x86_64", "AMD64") or not {"avx2", "fma"} <= _cpu_flags():
    pytest.skip("needs an x86-64 CPU with AVX2 and FMA")
  if not (os.environ.get("CI") or native.compiler()):
    pytest.skip("no C++ compiler")
  tmp = tmp_path_factory.mktemp("isa")
  return _run(tmp, "x86-64-v3"), _run(tmp, "native")


def test_avx2_build_targets_avx2_without_avx512(builds):
  v3, _ = builds
  isa = str(v3["isa"]).split()
  assert "avx2" in isa and "fma" in isa and "avx512f" not in isa


def test_avx2_and_native_builds_are_bit_identical(builds):
  v3, nat = builds
  keys = sorted(k for k in v3 if k not in ("isa", "arch"))
  assert keys == sorted(k for k in nat if k not in ("isa", "arch"))
  assert len(keys) == 2 * 5 + 3 * 2 + 1 + 4
  for k in keys:
    np.testing.assert_array_equal(v3[k], nat[k], err_msg=k)


def test_avx2_build_matches_xla_formulations(builds):
  """Independent check of the AVX2 build's numbers: the pure-XLA
  formulations on the same inputs."""
  import jax
  import jax.numpy as jnp
  from semsam_jax.kernels import window_attention
  from semsam_jax.models import deformable_attention as da
  from tests import native_isa_outputs as gen
  v3, _ = builds
  x = gen.inputs()
  with jax.default_matmul_precision("highest"):
    for tag, a in x["msda"].items():
      out, vjp = jax.vjp(lambda v, l, w: da.ms_deform_attn(v, a["shapes"], l, w, impl="gather"),
                         a["value"], a["loc"], a["aw"])
      np.testing.assert_allclose(v3[f"msda_{tag}_out"], out, rtol=1e-5, atol=1e-5)
      for name, g in zip(("value", "loc", "aw"), vjp(jnp.asarray(a["cot"]))):
        np.testing.assert_allclose(v3[f"msda_{tag}_grad_{name}"], g, rtol=1e-4, atol=1e-4,
                                   err_msg=f"{tag} grad {name}")
    for ws, a in x["window"].items():
      for kind, mask in (("plain", None), ("masked", a["mask"])):
        ref = window_attention.reference(a["qkv"], a["bias"], mask, a["heads"], a["scale"])
        np.testing.assert_allclose(v3[f"window_{ws}_{kind}"], ref, rtol=1e-5, atol=1e-5,
                                   err_msg=f"window {ws} {kind}")
  # Point reads: forward values bit for bit, gradient up to addition order.
  from semsam_jax.losses import points as pts
  pt = x["points"]
  out, vjp = jax.vjp(lambda m: pts.sample_maps(m, pt["index"], pt["coords"], impl="xla"),
                     pt["maps"])
  np.testing.assert_array_equal(v3["points_sample"], out)
  np.testing.assert_allclose(v3["points_sample_grad"], vjp(jnp.asarray(pt["cot"]))[0],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(v3["points_packed"], pts.sample_packed_masks(
      pt["masks"], pt["index"] % 3, pt["coords"], impl="xla"))
  np.testing.assert_array_equal(v3["points_uncertain"], pts.hashed_uncertain_coords(
      pt["maps"], pt["index"], pt["seeds"], 40, 90 / 40, 30 / 40, impl="xla"))
