"""Build, cache and registration of the native CPU kernels.

The C++ sources next to this file (``msda_cpu.cc``: multi-scale deformable
attention forward and backward; ``mask_stats_cpu.cc``: threshold counts of
upsampled mask logits; ``window_attention_cpu.cc``: Swin window attention; ``point_sample_cpu.cc``:
the training objective's point reads)
are XLA typed-FFI custom calls.  On first use they are
compiled into one shared library with the system C++ compiler (``$CXX``, else
``c++`` / ``g++`` / ``clang++``) against the FFI headers shipped with jaxlib,
for the instruction set named by ``$SEMSAM_JAX_NATIVE_ARCH`` (a GCC/Clang
``-march`` value; default ``native``, the machine it runs on; e.g.
``x86-64-v3`` for AVX2 + FMA, ``x86-64-v4`` for AVX-512), into
``$SEMSAM_JAX_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/semsam_jax`` or
``~/.cache/semsam_jax``).  The file name carries a hash of the sources, the
compiler command (including the ``-march`` value), the jaxlib version and
the CPU's feature flags, so a changed source, toolchain, ISA or machine gets
its own build; the library is
written under a temporary name and renamed, so a partial file is never
loaded.  Building takes a few seconds, once per machine.

``SEMSAM_JAX_NATIVE=0`` disables the kernels: :func:`available` is then
False and callers use their pure-XLA formulations.

Registration with XLA is process-wide by nature (custom-call targets are
looked up by name); it happens once, under a lock.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import jax

HERE = Path(__file__).parent
SOURCES = (HERE / "msda_cpu.cc", HERE / "mask_stats_cpu.cc", HERE / "window_attention_cpu.cc",
           HERE / "point_sample_cpu.cc")
HEADERS = (HERE / "kernel_common.h",)
ABI_VERSION = 1
# name -> exported handler symbol
TARGETS = {
    "semsam_msda_cpu_forward": "SemsamMsdaForward",
    "semsam_msda_cpu_backward": "SemsamMsdaBackward",
    "semsam_msda_cpu_query_forward": "SemsamMsdaQueryForward",
    "semsam_mask_counts_cpu": "SemsamMaskCounts",
    "semsam_window_attention_cpu": "SemsamWindowAttention",
    "semsam_point_sample_cpu": "SemsamPointSample",
    "semsam_point_sample_grad_cpu": "SemsamPointSampleGrad",
    "semsam_packed_sample_cpu": "SemsamPackedSample",
    "semsam_uncertain_points_cpu": "SemsamUncertainPoints",
}
# Batch-partitionable under SPMD (every operand and result is batch-major).
BATCH_PARTITIONABLE = tuple(TARGETS)
# -ffp-contract=off: no fused multiply-adds, so results round like XLA's
# formulations of the same arithmetic (and do not depend on the ISA built for).
BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-w")
ARCH_ENV = "SEMSAM_JAX_NATIVE_ARCH"
_ARCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

_lock = threading.Lock()
_state: dict = {}   # "lib" once loaded, or "error" (str) once failed


class KernelUnavailableError(RuntimeError):
  """The native kernels could not be built or loaded (the message says why)."""


def cache_dir() -> Path:
  env = os.environ.get("SEMSAM_JAX_KERNEL_CACHE")
  if env:
    return Path(env)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "semsam_jax"


def arch() -> str:
  """The ``-march`` value the kernels are built for (``$SEMSAM_JAX_NATIVE_ARCH``,
  default ``native``)."""
  value = os.environ.get(ARCH_ENV, "").strip() or "native"
  if not _ARCH_RE.match(value):
    raise KernelUnavailableError(f"{ARCH_ENV}={value!r} is not a -march value "
                                 "(e.g. native, x86-64-v3, x86-64-v4)")
  return value


def flags(march: str | None = None) -> tuple[str, ...]:
  """Compiler flags for ``march`` (default :func:`arch`)."""
  return (f"-march={march or arch()}", *BASE_FLAGS)


def compiler() -> str | None:
  """The C++ compiler that builds the kernels, or None."""
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return name
  return None


def _cpu_signature() -> str:
  """Machine and CPU feature flags (the build is specific to them)."""
  flags = ""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          flags = line
          break
  except OSError:
    pass
  return f"{platform.machine()}|{platform.processor()}|{flags}"


def library_path(cxx: str, sources=SOURCES, march: str | None = None) -> Path:
  import jaxlib
  march = march or arch()
  h = hashlib.sha256()
  for src in (*sources, *HEADERS):
    h.update(Path(src).read_bytes())
  h.update(repr((cxx, flags(march), jaxlib.__version__, _cpu_signature())).encode())
  tag = re.sub(r"[^A-Za-z0-9]+", "_", march)
  return cache_dir() / f"semsam_kernels-{tag}-{h.hexdigest()[:16]}.so"


def build(cxx: str, target: Path, sources=SOURCES, march: str | None = None) -> None:
  """Compiles ``sources`` into ``target`` (atomically: temp file + rename)."""
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
  os.close(fd)
  cmd = [cxx, *flags(march), f"-I{HERE}", f"-I{jax.ffi.include_dir()}", *map(str, sources), "-o", tmp]
  try:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
      names = ", ".join(Path(s).name for s in sources)
      raise KernelUnavailableError(
          f"compiling {names} failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def load():
  """Builds (if needed), loads and registers the kernels once per process.

  Returns the ``ctypes.CDLL``; raises :class:`KernelUnavailableError`.
  """
  with _lock:
    if "lib" in _state:
      return _state["lib"]
    if "error" in _state:
      raise KernelUnavailableError(_state["error"])
    try:
      if os.environ.get("SEMSAM_JAX_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise KernelUnavailableError("disabled by SEMSAM_JAX_NATIVE=0")
      if sys.platform == "win32":
        raise KernelUnavailableError("the native kernels are built for Linux/macOS only")
      cxx = compiler()
      if cxx is None:
        raise KernelUnavailableError("no C++ compiler found (set $CXX or install g++)")
      path = library_path(cxx)
      if not path.exists():
        build(cxx, path)
      lib = ctypes.CDLL(str(path))
      if lib.SemsamKernelsAbiVersion() != ABI_VERSION:
        raise KernelUnavailableError(f"{path} has ABI {lib.SemsamKernelsAbiVersion()}, "
                                     f"expected {ABI_VERSION}")
      for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
      for name in BATCH_PARTITIONABLE:
        jax.ffi.register_ffi_target_as_batch_partitionable(name)
    except KernelUnavailableError as e:
      _state["error"] = str(e)
      raise
    except OSError as e:  # filesystem / dlopen problems
      _state["error"] = f"loading the native kernels failed: {e}"
      raise KernelUnavailableError(_state["error"]) from e
    _state["lib"] = lib
    return lib


def available() -> bool:
  """True when the kernels are (or can be) built and loaded here."""
  try:
    load()
  except KernelUnavailableError:
    return False
  return True


def usable_here() -> bool:
  """True when JAX computes on the CPU and the kernels are available: the
  condition under which the "auto" choices use them."""
  return jax.default_backend() == "cpu" and available()


def cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo; else ``platform.processor()``)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith(("model name", "hardware")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def build_info() -> dict:
  """Where and for what the kernels run: CPU model, ``-march`` value and the
  vector extensions the loaded build was compiled with (``isa``; None when the
  kernels are unavailable, with ``unavailable`` saying why)."""
  info = {"cpu": cpu_model(), "arch": os.environ.get(ARCH_ENV, "").strip() or "native",
          "isa": None}
  try:
    lib = load()
  except KernelUnavailableError as e:
    info["unavailable"] = str(e)
    return info
  fn = lib.SemsamKernelsIsa
  fn.restype = ctypes.c_char_p
  info["isa"] = fn().decode().strip() or "generic"
  return info


def unavailable_reason() -> str | None:
  """Why :func:`available` is False (None when it is True)."""
  try:
    load()
  except KernelUnavailableError as e:
    return str(e)
  return None
