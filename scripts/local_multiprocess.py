"""Run N copies of a command as one JAX multi-process job on 127.0.0.1 (tests, demos).

    python scripts/local_multiprocess.py --num-processes 2 --devices-per-process 4 \\
        --timeout 600 -- python train.py --config configs/tiny.py --workdir runs/mp

Each child gets the coordinator environment that ``train.py`` / ``eval.py``
read (``semsam_jax.distributed.initialize_from_env``): ``JAX_COORDINATOR_ADDRESS``
(127.0.0.1:<free port>), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; plus
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` and
``JAX_PLATFORMS=cpu``.  On CPU the programs switch the cross-process
collectives to gloo themselves when ``JAX_NUM_PROCESSES > 1``.

Every line a child prints is echoed as ``[p<i>] line``.  The launcher waits
at most ``--timeout`` seconds; on timeout, on SIGINT/SIGTERM to itself, or
when a child fails, it kills all children (SIGTERM, then SIGKILL after
``--grace`` seconds).  Exit status: 0 when every child exited 0, else the
first nonzero child status (124 on timeout; 128 + N for a child killed by
signal N, e.g. 137 after ``kill -9``).  Only the standard library.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(base: dict, *, port: int, num: int, pid: int, devices: int) -> dict:
  env = dict(base)
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num),
             JAX_PROCESS_ID=str(pid), JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"),
             PYTHONUNBUFFERED="1")
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def _pump(i, stream, out, lock):
  for line in iter(stream.readline, ""):
    with lock:
      out.write(f"[p{i}] {line}")
      out.flush()
  stream.close()


def run(cmd, *, num_processes: int, devices_per_process: int, timeout: float,
        grace: float = 10.0, env: dict | None = None, out=None, cwd=None) -> int:
  """Starts the job, waits, returns its status (see the module docstring)."""
  out = out or sys.stdout
  port = free_port()
  lock = threading.Lock()
  procs, pumps = [], []
  base = dict(os.environ if env is None else env)
  try:
    for i in range(num_processes):
      p = subprocess.Popen(cmd, env=child_env(base, port=port, num=num_processes, pid=i,
                                              devices=devices_per_process),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=cwd, start_new_session=True)
      procs.append(p)
      with lock:
        out.write(f"[launcher] process {i}: pid {p.pid}\n")
        out.flush()
      t = threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
      t.start()
      pumps.append(t)
    deadline = time.monotonic() + timeout
    status = None
    while status is None:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed:
        status = failed[0]
        with lock:
          out.write(f"[launcher] a process exited with {status}; stopping the others\n")
      elif all(c == 0 for c in codes):
        status = 0
      elif time.monotonic() > deadline:
        status = 124
        with lock:
          out.write(f"[launcher] timeout after {timeout:.0f} s; killing the job\n")
      else:
        time.sleep(0.2)
    return status
  finally:
    _kill_all(procs, grace)
    for t in pumps:
      t.join(timeout=5)


def _kill_all(procs, grace):
  live = [p for p in procs if p.poll() is None]
  for p in live:
    try:
      os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
  end = time.monotonic() + grace
  for p in live:
    try:
      p.wait(timeout=max(end - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      pass
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--num-processes", "-n", type=int, default=2)
  ap.add_argument("--devices-per-process", "-d", type=int, default=4)
  ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole job")
  ap.add_argument("--grace", type=float, default=10.0,
                  help="seconds between SIGTERM and SIGKILL when stopping children")
  ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command and its arguments")
  a = ap.parse_args(argv)
  cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
  if not cmd:
    ap.error("no command given (put it after --)")

  def on_signal(signum, _):
    raise SystemExit(128 + signum)  # unwinds through run()'s finally: children killed

  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)
  status = run(cmd, num_processes=a.num_processes, devices_per_process=a.devices_per_process,
             timeout=a.timeout, grace=a.grace)
  return 128 - status if status < 0 else status  # a child killed by signal N: 128 + N


if __name__ == "__main__":
  sys.exit(main())
