"""FlowBP services: the Ray runtime, the reward service and the job controller (they build on flowbp_core)."""
