"""The reward service's metric names (histograms [deployment]). `services/runtime/metric_names.py` lists them
with every other runtime metric; they live here because the reward service imports nothing from the runtime."""

from __future__ import annotations

REWARD_REQUEST_SECONDS = "flowbp_reward_request_seconds"
REWARD_BATCH_SIZE = "flowbp_reward_batch_size"
