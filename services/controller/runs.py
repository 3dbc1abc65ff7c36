"""Read-only views of a run's folder: its checkpoints, its metrics log and its trained LoRA.

Layout (docs/interfaces.md, flowbp_core.checkpoint): runs/<run_id>/step_<n>/ written to step_<n>.tmp-* and
renamed, with a COMPLETE marker written last. Per-step metrics come from runs/<run_id>/metrics.jsonl (one JSON
object with a `step` per line, written by the single-process loop flowbp_core.run) or, for runs of the Ray
runtime, from the `"event": "step"` rows of runs/<run_id>/events.jsonl. The LoRA offered for download is the
diffusers export (`pytorch_lora_weights.safetensors`) when the checkpoint has one, else, for a LoRA run, the
checkpoint's `trainable.safetensors` (the adapter's own weights, peft naming). The controller scans this layout
itself instead of importing flowbp_core.checkpoint, which pulls in torch: the controller must stay a small
process. A step folder without COMPLETE is a checkpoint being written (or abandoned by a crash) and is never
offered for resume or download.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .models import CheckpointInfo, CheckpointRef, MetricPoint

COMPLETE_MARKER = "COMPLETE"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
TRAINABLE_FILE = "trainable.safetensors"
_STEP = re.compile(r"^step_(\d+)$")
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# diffusers' default LoRA file name first, then any other *lora*.safetensors the exporter may have chosen.
LORA_NAMES = ("pytorch_lora_weights.safetensors",)


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def checkpoints(self) -> list[CheckpointInfo]:
        if not self.path.is_dir():
            return []
        out = []
        for d in self.path.iterdir():
            m = _STEP.match(d.name)
            if m and d.is_dir():
                out.append(CheckpointInfo(step=int(m.group(1)), path=str(d), complete=(d / COMPLETE_MARKER).exists()))
        return sorted(out, key=lambda c: c.step)

    def latest_complete(self) -> CheckpointRef | None:
        for c in reversed(self.checkpoints()):
            if c.complete:
                marker = Path(c.path) / COMPLETE_MARKER
                try:
                    at = marker.stat().st_mtime
                except FileNotFoundError:  # removed between the scan and now (retention): try an older one
                    continue
                return CheckpointRef(step=c.step, path=c.path, completed_at=at)
        return None

    def metrics(self, last: int | None = None) -> list[MetricPoint]:
        """Metric rows in file order; a torn last line (the trainer is mid-write) and non-JSON lines are skipped."""
        f, only_steps = self.path / METRICS_FILE, False
        if not f.is_file():
            f, only_steps = self.path / EVENTS_FILE, True
            if not f.is_file():
                return []
        rows = []
        for line in f.read_text(errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("step"), int):
                continue
            if only_steps and obj.get("event") != "step":
                continue
            rows.append(MetricPoint(**obj))
        return rows[-last:] if last else rows

    def lora_file(self, lora_run: bool = True) -> tuple[CheckpointRef, Path, str] | None:
        """(newest complete checkpoint, file, format) with format `diffusers` or `trainable_state_dict`."""
        ref = self.latest_complete()
        if ref is None:
            return None
        d = Path(ref.path)
        for name in LORA_NAMES:
            found = sorted(d.rglob(name))
            if found:
                return ref, found[0], "diffusers"
        found = sorted(p for p in d.rglob("*.safetensors") if "lora" in p.name.lower())
        if found:
            return ref, found[0], "diffusers"
        if lora_run and (d / TRAINABLE_FILE).is_file():
            return ref, d / TRAINABLE_FILE, "trainable_state_dict"
        return None


def run_folder(runs_dir: Path, run_id: str) -> RunFolder:
    if not re.match(RUN_ID_PATTERN, run_id):
        # run ids are validated when a job is accepted; this guards the filesystem against a hand-edited record
        raise ValueError(f"run_id {run_id!r} does not match {RUN_ID_PATTERN}")
    return RunFolder(Path(runs_dir) / run_id)
