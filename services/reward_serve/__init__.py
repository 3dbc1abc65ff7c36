"""Ray Serve reward deployments: value-and-grad for training, score-only for evaluation."""
