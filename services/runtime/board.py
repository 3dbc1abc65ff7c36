"""StepBoard: the one rendezvous between the driver and the learner group (a small async Ray actor).

Why a board and not TorchTrainer's own channels: Ray Train runs the learner loop inside `fit()`, which blocks,
and its reported metrics can come back empty (Train v2). The driver instead *offers* each step's cache refs
here, every learner rank *takes* the offer for the step it is at, and rank 0 *reports* a typed StepOutcome.
When Ray Train restarts a failed learner group, rank 0 says hello again with a new generation and the step it
resumed from; the driver rewinds to that step. Only ObjectRefs pass through here, never cache bytes.
"""

from __future__ import annotations

import asyncio

import ray

from services.runtime.payloads import LearnerHello, LearnerWork, StepOutcome
from services.runtime.placement import on_this_node

STOP = "stop"


def start_board():
    """A StepBoard on the driver's node: every step's offers and outcomes pass through it, so a board elsewhere
    would die with a node the run could otherwise survive, and put a network hop in every call."""
    return StepBoard.options(scheduling_strategy=on_this_node()).remote()


@ray.remote(num_cpus=0)
class StepBoard:
    def __init__(self) -> None:
        self.work: dict[int, LearnerWork] = {}
        self.outcomes: list[StepOutcome] = []  # those the driver has not read yet
        self.first_outcome = 0  # the index of outcomes[0] among all outcomes reported
        self.hello: LearnerHello | None = None
        self.generation = 0
        self.placed = 0  # learner groups whose rank 0 has started (its ranks hold their resources)
        self.stopped = False
        self.cond = asyncio.Condition()

    # ---- learner side --------------------------------------------------------------------------------
    async def mark_placed(self) -> None:
        async with self.cond:
            self.placed += 1
            self.cond.notify_all()

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    async def say_hello(self, hello: LearnerHello) -> None:
        async with self.cond:
            self.hello = hello
            # Offers for steps the new generation has not reached are still valid only if sampled with the
            # weights it resumed with; the driver re-offers, so drop them.
            self.work.clear()
            self.cond.notify_all()

    async def take(self, step: int, generation: int, timeout_s: float = 5.0):
        """The offer for `step` (LearnerWork), STOP, or None on timeout (the caller polls again)."""
        async with self.cond:
            try:
                await asyncio.wait_for(
                    self.cond.wait_for(lambda: self.stopped or step in self.work or generation != self.generation),
                    timeout_s)
            except asyncio.TimeoutError:
                return None
            if self.stopped or generation != self.generation:
                return STOP
            return self.work[step]

    async def report(self, outcome: StepOutcome) -> None:
        async with self.cond:
            self.outcomes.append(outcome)
            self.work.pop(outcome.step, None)  # frees the cache refs
            self.cond.notify_all()

    # ---- driver side -------------------------------------------------------------------------------------
    async def offer(self, work: LearnerWork) -> bool:
        """Post `work`; False (dropped) when it was sampled for another generation than the newest one, whose
        learner would otherwise train on a dead generation's caches."""
        async with self.cond:
            if work.generation != self.generation:
                return False
            self.work[work.step] = work
            self.cond.notify_all()
            return True

    async def wait_placed(self, timeout_s: float = 5.0) -> bool:
        """Whether a learner group has started its ranks (waits up to timeout_s)."""
        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(lambda: self.placed > 0 or self.stopped), timeout_s)
            except asyncio.TimeoutError:
                pass
            return self.placed > 0

    async def wait_hello(self, after_generation: int, timeout_s: float = 5.0) -> LearnerHello | None:
        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(
                    lambda: self.hello is not None and self.hello.generation > after_generation), timeout_s)
            except asyncio.TimeoutError:
                return None
            return self.hello

    async def wait_outcomes(self, since: int, timeout_s: float = 1.0) -> tuple[list[StepOutcome], LearnerHello | None]:
        """Outcomes from index `since` on (waits up to timeout_s for at least one), and the current hello.

        Asking from `since` says the driver holds those before it: they are dropped here, and with them the refs
        of the weights they published (each would otherwise stay pinned in the object store for the whole run)."""
        async with self.cond:
            del self.outcomes[:max(0, since - self.first_outcome)]
            self.first_outcome = max(self.first_outcome, since)
            try:
                await asyncio.wait_for(self.cond.wait_for(
                    lambda: self.first_outcome + len(self.outcomes) > since), timeout_s)
            except asyncio.TimeoutError:
                pass
            return self.outcomes[since - self.first_outcome:], self.hello

    async def stop(self) -> None:
        async with self.cond:
            self.stopped = True
            self.work.clear()
            self.cond.notify_all()
