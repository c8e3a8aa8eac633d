"""Train Semantic-SAM: ``python train.py --config configs/<name>.py --workdir DIR [--config.x=y ...]``.

Resumes from the latest complete checkpoint in ``DIR/checkpoints``.  Multi-process
runs (one process per host) call ``jax.distributed.initialize`` when
``JAX_COORDINATOR_ADDRESS`` is set (with ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``), or always with ``--distributed`` (cluster auto-detection:
Cloud TPU pod slices, SLURM).  With ``JAX_PLATFORMS=cpu`` the cross-process
collectives are gloo.  ``scripts/local_multiprocess.py`` starts such a job on
one machine; docs/reliability.md.  See README "Training".
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs, export)")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "call jax.distributed.initialize() with cluster auto-detection "
    "(TPU pod slices, SLURM) even without JAX_COORDINATOR_ADDRESS")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from semsam_jax.distributed import initialize_from_env
  initialize_from_env(auto=_DISTRIBUTED.value)
  from semsam_jax.training.loop import NonFiniteError, train
  try:
    result = train(_CONFIG.value, _WORKDIR.value)
  except NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  if result.preempted:
    return 143
  return 0


if __name__ == "__main__":
  app.run(main)
