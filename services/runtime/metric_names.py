"""Every metric the runtime exports, by name: the dashboards and alert rules read this module, not the code.

Declared with `ray.util.metrics`; Ray's Prometheus export prefixes each name with `PROMETHEUS_PREFIX`, so the
series a dashboard queries is e.g. `ray_flowbp_loss`. Tags are listed beside each name (docs/interfaces.md).
"""

from __future__ import annotations

from flowbp_core.stages import STAGES
from services.reward_serve.metric_names import REWARD_BATCH_SIZE, REWARD_REQUEST_SECONDS

PROMETHEUS_PREFIX = "ray_"

# histogram [phase: rollout|transfer|surrogate|reward|backward|update|sync] [run_id]
STEP_PHASE_SECONDS = "flowbp_step_phase_seconds"
# gauges [run_id]
REWARD_MEAN = "flowbp_reward_mean"
GRAD_NORM = "flowbp_grad_norm"
LOSS = "flowbp_loss"
POLICY_VERSION = "flowbp_policy_version"
STALENESS = "flowbp_staleness"
STRAIGHT_THROUGH_RESIDUAL = "flowbp_straight_through_residual"
QUEUE_DEPTH = "flowbp_queue_depth"
SAMPLES_PER_SECOND = "flowbp_samples_per_second"
# counters
STEPS_TOTAL = "flowbp_steps_total"  # [run_id]
SKIPPED_STEPS_TOTAL = "flowbp_skipped_steps_total"  # [run_id, reason]
# gauge [run_id, metric]
EVAL_SCORE = "flowbp_eval_score"
# histogram [run_id, backend]
WEIGHT_SYNC_SECONDS = "flowbp_weight_sync_seconds"
# reward service histograms [deployment]: REWARD_REQUEST_SECONDS, REWARD_BATCH_SIZE (services/reward_serve)

PHASES = STAGES  # the `phase` tag's values: the step's stages, named once in flowbp_core.stages

ALL = (
    STEP_PHASE_SECONDS,
    REWARD_MEAN,
    GRAD_NORM,
    LOSS,
    POLICY_VERSION,
    STALENESS,
    STRAIGHT_THROUGH_RESIDUAL,
    QUEUE_DEPTH,
    SAMPLES_PER_SECOND,
    STEPS_TOTAL,
    SKIPPED_STEPS_TOTAL,
    EVAL_SCORE,
    WEIGHT_SYNC_SECONDS,
    REWARD_REQUEST_SECONDS,
    REWARD_BATCH_SIZE,
)
