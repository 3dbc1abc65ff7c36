"""`runtime`: how a run is laid out on Ray (workers, learner ranks, modes, weight sync, placement). Its own module
because the run schema (`flowbp_core.config`, which re-exports it) is otherwise too long to hold."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .config_base import Strict


class RuntimeSpec(Strict):
    rollout_workers: int = Field(1, ge=1, le=256)
    learners: int = Field(1, ge=1, le=256)
    mode: Literal["sync", "async"] = Field("sync", description="sync: rollout t+1 uses learner step t's weights")
    max_staleness: int = Field(0, ge=0, le=100, description="policy versions a cache may lag in async mode")
    queue_depth: int = Field(2, ge=1, le=64, description="in-flight rollout ObjectRefs (back-pressure)")
    rollout_num_cpus: float = Field(1.0, gt=0.0, le=64.0)
    learner_num_cpus: float = Field(1.0, gt=0.0, le=64.0)
    use_gpu: bool = False
    rollout_gpus: float = Field(1.0, ge=0.0, le=8.0, description="GPUs a rollout worker takes with use_gpu: a "
                                "fraction shares a card with other actors (a one-GPU machine runs every role), "
                                "above 1 a whole number")
    learner_gpus: float = Field(1.0, ge=0.0, le=8.0, description="GPUs a learner rank takes with use_gpu (as "
                                "rollout_gpus; with learners > 1 at least 1: NCCL takes one card a rank)")
    strategy: Literal["ddp", "fsdp"] = "ddp"
    weight_sync: Literal["auto", "lora_delta", "full_state", "collective"] = Field(
        "auto", description="how weights reach the rollout workers: auto (lora_delta with LoRA, else full_state), "
        "or collective (torch.distributed broadcasts from learner rank 0: gloo on CPU, nccl with use_gpu)")
    weight_sync_bucket_mb: float = Field(64.0, gt=0.0, le=16_384.0, description="full_state and collective: MiB "
                                         "a bucket")
    weight_sync_same_device: bool = Field(True, description="collective: a rollout worker on learner rank 0's "
                                          "device (its GPU, or the CPU of its node) maps the published buckets "
                                          "by CUDA IPC / shared memory instead of joining a broadcast")
    compile_rollout: bool = Field(False, description="rollout workers sample through a transformer compiled with "
                                  "static shapes (each micro-batch padded to rollout_batch rows; the learner "
                                  "re-forwards eagerly)")
    rollout_cuda_graphs: bool = Field(True, description="with compile_rollout on a GPU: the compiled transformer "
                                      "replays as CUDA graphs (torch.compile mode reduce-overhead); no effect on "
                                      "the CPU")
    rollout_batch: int | None = Field(None, ge=1, le=4096, description="samples a rollout worker puts through "
                                      "the transformer at once (true CFG runs twice as many rows: both branches "
                                      "in one batch); None: its whole shard of the step")
    max_actor_restarts: int = Field(3, ge=0, le=100, description="restarts of each rollout worker and failures "
                                    "of the learner group a run survives (a learner group still waiting for its "
                                    "nodes is not failing: hello_timeout_s bounds that wait)")
    hello_timeout_s: float = Field(600.0, ge=10.0, le=86_400.0, description="seconds the driver waits for the "
                                   "learner group to start or restart, and for one step's rollout (whose workers "
                                   "may be restarting on a new node); with GPU groups that scale from zero it "
                                   "covers a node's start, the image pull and the model load")
    role_resources: bool = Field(False, description="rollout workers, learner ranks and reward replicas request "
                                 "the custom resource flowbp_<role> (flowbp_rollout, flowbp_learner, "
                                 "flowbp_reward) that the Helm chart's worker groups provide, so each role lands "
                                 "on its own group; off: any node with CPUs and GPUs to spare")

    @field_validator("rollout_gpus", "learner_gpus")
    @classmethod
    def _ray_gpu_amount(cls, v: float, info: ValidationInfo) -> float:
        if v > 1 and v != int(v):
            raise ValueError("a fraction in [0, 1] or a whole number up to 8 (Ray shares a GPU only below 1)")
        learners, gpu = info.data.get("learners", 1), info.data.get("use_gpu", False)
        if info.field_name == "learner_gpus" and gpu and learners > 1 and v < 1:
            raise ValueError(f"at least 1 with runtime.learners={learners} on a use_gpu run (NCCL takes one GPU a "
                             "learner rank)")
        return v

    @model_validator(mode="after")
    def _staleness(self) -> "RuntimeSpec":
        if self.mode == "sync" and self.max_staleness != 0:
            raise ValueError("max_staleness must be 0 in sync mode (set mode: async to let rollout run ahead)")
        return self
