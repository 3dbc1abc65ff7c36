"""Ray runtime: rollout workers, learner group, weight sync, driver and telemetry (math lives in flowbp_core)."""
