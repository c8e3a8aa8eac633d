"""``train.py`` with the Hungarian matcher replaced by "target t -> token t".

For the 2 processes x 4 devices == 1 process x 8 devices drill
(tests/test_drills.py): the matching of a random-init model is full of
near-ties, so the ulp-level differences between gloo's cross-process sums and
one process's sums flip assignments from the second step on and move losses
by ~1e-3; without that discrete choice the two runs agree to float noise.
Same command line as train.py.
"""

import pathlib
import runpy
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from semsam_jax.losses import matcher  # noqa: E402
from tests.test_train import _fixed_match  # noqa: E402

matcher.match = _fixed_match  # read by losses.objective.make_objective when the step is built
sys.argv[0] = str(REPO / "train.py")
runpy.run_path(str(REPO / "train.py"), run_name="__main__")
