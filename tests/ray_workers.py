"""Generation actors that misbehave on purpose, for tests/test_ray.py (importable by Ray's worker processes,
which get the driver's sys.path)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from probe.generate.executors import InitImages, JobOutcome
from probe.generate.ray_executor import GenerationWorker
from probe.planning.job import Job

POISON = "a poison prompt"


class PoisonWorker(GenerationWorker):
    """Dies (as a segfaulting kernel would) on any batch holding the poison prompt."""

    def generate(self, batch: Sequence[Job], init_images: InitImages) -> list[JobOutcome]:
        if any(job.prompt == POISON for job in batch):
            os._exit(1)
        return super().generate(batch, init_images)


class StaleWorker(GenerationWorker):
    """Reports an older diffusers than the driver's, as a node with a stale install would."""

    def fingerprint(self) -> dict[str, str]:
        return {**super().fingerprint(), "diffusers": "0.0.1"}
