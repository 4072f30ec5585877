"""Score requests (teacher-forced log-probs), batched into as few forwards as the limits allow."""

from __future__ import annotations

import logging

from service import metrics
from service.engine.batch import ModelRunner, ScoreOutput
from service.engine.delivery import ScoreJob, settle_threadsafe
from service.engine.health import FailureStreak
from service.engine.sequence import EngineError

log = logging.getLogger(__name__)


class ScoreBatcher:
    """Runs queued ScoreJobs on the worker thread and settles each caller's future."""

    def __init__(
        self, runner: ModelRunner, max_batch_size: int, max_prefill_tokens: int, failures: FailureStreak
    ) -> None:
        self._runner = runner
        self._max_batch_size = max_batch_size
        self._max_prefill_tokens = max_prefill_tokens
        self._failures = failures

    def run(self, jobs: list[ScoreJob]) -> None:
        """Every job, in batches of at most max_batch_size rows and max_prefill_tokens padded tokens (one
        forward each: a CPU forward costs about the same for one row as for several)."""
        jobs = sorted(jobs, key=lambda job: len(job.prompt_ids) + len(job.continuation_ids))  # less padding
        batch: list[ScoreJob] = []
        width = 0
        for job in jobs:
            next_width = max(width, len(job.prompt_ids) + len(job.continuation_ids))
            if batch and (
                len(batch) >= self._max_batch_size or next_width * (len(batch) + 1) > self._max_prefill_tokens
            ):
                self._score_batch(batch)
                batch, next_width = [], len(job.prompt_ids) + len(job.continuation_ids)
            batch.append(job)
            width = next_width
        if batch:
            self._score_batch(batch)

    def _score_batch(self, jobs: list[ScoreJob]) -> None:
        try:
            results: list[ScoreOutput] | BaseException = self._runner.score_batch(
                [(job.prompt_ids, job.continuation_ids, job.use_hooks, job.table) for job in jobs]
            )
            metrics.BATCH_SIZE.observe(len(jobs))
            self._failures.succeeded()
        except Exception as exc:
            self._failures.failed()
            log.exception("score forward failed")
            results = EngineError(f"score forward failed: {exc!r}")
        for i, job in enumerate(jobs):
            settle_threadsafe(job, results if isinstance(results, BaseException) else results[i])
