"""Pieces shared by the command lines (``python -m semsam_jax`` and
``python -m semsam_jax.convert``): Ctrl-C handling, error lines, the
persistent compilation cache, staged output folders."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading

EXIT_INTERRUPTED = 130
# Temporary paths removed when the process is interrupted.
_TEMP_PATHS: set[str] = set()
_TEMP_LOCK = threading.Lock()


def register_temp(path: str) -> None:
  with _TEMP_LOCK:
    _TEMP_PATHS.add(path)


def unregister_temp(path: str) -> None:
  with _TEMP_LOCK:
    _TEMP_PATHS.discard(path)


def _remove_temps() -> None:
  with _TEMP_LOCK:
    paths = list(_TEMP_PATHS)
  for p in paths:
    shutil.rmtree(p, ignore_errors=True)


def _interrupted_exit() -> None:
  _remove_temps()
  try:
    sys.stderr.write("\nerror: interrupted\n")
    sys.stderr.flush()
  finally:
    os._exit(EXIT_INTERRUPTED)


def exit_on_interrupt() -> None:
  """Makes SIGINT (Ctrl-C) end the process at once with status 130 and one
  line on stderr, whatever the process is doing (also inside a long XLA
  compilation, where a Python-level KeyboardInterrupt cannot arrive and
  unwinding through native threads can crash the interpreter).

  SIGINT is blocked in the calling (main) thread, and so in every thread
  started afterwards, and a daemon thread waits for it.  Call it first
  thing in a command line's entry point, before jax starts its threads;
  not meant for library use (it takes SIGINT away from the caller).
  """
  if threading.current_thread() is not threading.main_thread():
    return
  # Should a thread started earlier receive the signal, Python runs this
  # handler in the main thread at its next bytecode.
  signal.signal(signal.SIGINT, lambda *_: _interrupted_exit())
  if hasattr(signal, "pthread_sigmask") and hasattr(signal, "sigwait"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def wait():
      signal.sigwait({signal.SIGINT})
      _interrupted_exit()

    threading.Thread(target=wait, name="semsam-sigint", daemon=True).start()


def one_line(text: str) -> str:
  """Whitespace (newlines included) collapsed to single spaces."""
  return " ".join(str(text).split())


def error_lines(message: str, max_lines: int) -> str:
  lines = f"error: {message}".splitlines()
  if len(lines) > max_lines:
    lines = lines[:max_lines] + [f"  ... ({len(lines) - max_lines} more lines)"]
  return "\n".join(lines)


# --------------------------------------------------------------------------
# Persistent compilation cache

COMPILE_CACHE_ENV = "SEMSAM_JAX_COMPILE_CACHE"          # 0/false/off/no: disabled
COMPILE_CACHE_DIR_ENV = "SEMSAM_JAX_COMPILE_CACHE_DIR"  # location override


def compile_cache_dir() -> str:
  """``$SEMSAM_JAX_COMPILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/semsam_jax/jax_cache``
  (``~/.cache/semsam_jax/jax_cache``)."""
  env = os.environ.get(COMPILE_CACHE_DIR_ENV)
  if env:
    return os.path.abspath(os.path.expanduser(env))
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "semsam_jax", "jax_cache")


def compile_cache_enabled(flag_off: bool = False) -> bool:
  if flag_off:
    return False
  return os.environ.get(COMPILE_CACHE_ENV, "1").strip().lower() not in ("0", "false", "off",
                                                                         "no", "")


def enable_compile_cache(flag_off: bool = False) -> str | None:
  """Turns on JAX's persistent compilation cache (every compiled executable
  is stored, so a later process with the same shapes loads instead of
  compiling).  Returns the directory, or None when disabled or unusable (a
  warning says why)."""
  if not compile_cache_enabled(flag_off):
    return None
  path = compile_cache_dir()
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(f"{path} is not writable")
  except OSError as e:
    print(f"warning: compilation cache off ({one_line(e)})", file=sys.stderr)
    return None
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


# --------------------------------------------------------------------------
# Output folders

def check_output_dir(path: str) -> None:
  """Raises ``ValueError`` unless ``path`` is a writable directory or can be
  created (checked before any work; nothing is created)."""
  p = os.path.abspath(path)
  if os.path.exists(p):
    if not os.path.isdir(p):
      raise ValueError(f"output path {path} exists and is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
      raise ValueError(f"output directory {path} is not writable")
    return
  a = os.path.dirname(p)
  while not os.path.exists(a):
    a = os.path.dirname(a)
  if not os.path.isdir(a):
    raise ValueError(f"cannot create output directory {path}: {a} is not a directory")
  if not os.access(a, os.W_OK | os.X_OK):
    raise ValueError(f"cannot create output directory {path}: {a} is not writable")


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


class StagedOutput:
  """Outputs written into a temporary folder and moved into place at once.

  ``with StagedOutput(target, stale=regex) as tmp:`` -- write files under
  ``tmp`` (subfolders allowed).  On success: a missing ``target`` is created
  by renaming the temporary folder (atomic); an existing one gets the new
  files by rename, after files of earlier runs that match ``stale`` (paths
  relative to ``target``, ``/``-separated) and are not rewritten have been
  removed.  On any error, or Ctrl-C, the temporary folder is removed and
  ``target`` is untouched.  Folders get the usual umask permissions.
  """

  def __init__(self, target: str, stale: str | None = None):
    self.target = os.path.abspath(target)
    self.stale = re.compile(stale) if stale else None
    self.tmp: str | None = None

  def __enter__(self) -> str:
    exists = os.path.isdir(self.target)
    parent = self.target if exists else os.path.dirname(self.target)
    os.makedirs(parent, exist_ok=True)
    self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.tmp-", dir=parent)
    register_temp(self.tmp)
    return self.tmp

  def __exit__(self, exc_type, exc, tb):
    tmp, self.tmp = self.tmp, None
    try:
      if exc_type is None:
        self._commit(tmp)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
      unregister_temp(tmp)
    return False

  def _commit(self, tmp: str) -> None:
    mode = 0o777 & ~_umask()
    new = []
    for root, dirs, files in os.walk(tmp):
      os.chmod(root, mode)
      new += [os.path.relpath(os.path.join(root, f), tmp) for f in files]
    if not os.path.isdir(self.target):
      os.rename(tmp, self.target)
      return
    new_set = {p.replace(os.sep, "/") for p in new}
    if self.stale is not None:
      emptied = set()
      for root, _, files in os.walk(self.target):
        if os.path.abspath(root).startswith(os.path.join(self.target, ".")):
          continue
        for f in files:
          rel = os.path.relpath(os.path.join(root, f), self.target).replace(os.sep, "/")
          if rel not in new_set and self.stale.fullmatch(rel):
            os.remove(os.path.join(root, f))
            emptied.add(root)
      for d in sorted(emptied, reverse=True):  # subfolders emptied of stale files
        if d != self.target and not os.listdir(d):
          os.rmdir(d)
    # JSON files last: they list the others.
    for rel in sorted(new, key=lambda p: (p.endswith(".json"), p)):
      dst = os.path.join(self.target, rel)
      os.makedirs(os.path.dirname(dst), mode=mode, exist_ok=True)
      os.replace(os.path.join(tmp, rel), dst)
