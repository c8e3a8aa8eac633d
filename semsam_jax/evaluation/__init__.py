"""Evaluation protocols of Semantic-SAM (see ``docs/evaluation.md``).

* ``coco_interactive``: the original's ``evaluate_interactive`` (one centre
  click per ground-truth mask; 1-IoU Max / Oracle, NoC; per COCO area range).
* ``multi_granularity``: the SA-1B multi-granularity protocol, defined here
  because the released original cannot run it (``docs/differences.md``).

Typical use::

    from semsam_jax.evaluation import EvalOptions, Evaluator, iter_coco
    ev = Evaluator(config.model, params, EvalOptions())
    metrics = ev.evaluate(iter_coco("instances_val2017.json", "val2017/"))
"""

from semsam_jax.evaluation.clicks import (center_click, center_clicks, click_boxes,
                                          kornia_distance_transform)
from semsam_jax.evaluation.datasets import (EvalImage, SkipLog, detect_format, iter_coco,
                                            iter_semsam_data)
from semsam_jax.evaluation.evaluator import (PROTOCOLS, EvalOptions, Evaluator, format_table,
                                             metrics_of, sorted_results)
from semsam_jax.evaluation.metrics import mask_iou, select_max_oracle, summarize

from semsam_jax.assets import TINY_CHECKPOINT

# The model eval.py (and the demo with --steps 0) uses when no checkpoint is
# given: the committed tiny checkpoint (an absolute path inside the package).
DEFAULT_CHECKPOINT = TINY_CHECKPOINT

__all__ = [
    "DEFAULT_CHECKPOINT", "EvalImage", "EvalOptions", "Evaluator", "PROTOCOLS", "SkipLog",
    "center_click", "center_clicks", "click_boxes", "detect_format", "format_table",
    "iter_coco", "iter_semsam_data", "kornia_distance_transform", "mask_iou", "metrics_of",
    "select_max_oracle", "sorted_results", "summarize",
]
