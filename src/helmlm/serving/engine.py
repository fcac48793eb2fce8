"""The serving engine: one model, one decoding thread, a bounded queue of requests.

Requests are decoded one at a time, in arrival order, by a single worker thread, each with its own KV cache (every
:func:`~helmlm.generation.complete` call builds its own), so concurrent requests can never corrupt one another and
each output equals the same request run alone. A full queue refuses the request at once (the API answers 429)
instead of letting waiting clients pile up. On CPU one decoding thread also keeps the cores for the model's own
matmuls; batching requests would raise throughput on a GPU, and is left for when one is the target.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass, field

from helmlm.errors import ServerBusy
from helmlm.generation import SamplingSettings, check_request, complete


@dataclass
class Job:
    """One request: the prompt's ids, the sampling settings and stop strings, and two callbacks that the worker
    thread calls: ``on_text(piece)`` as text is generated, then ``on_done(text, error)`` exactly once."""

    prompt_ids: list[int]
    settings: SamplingSettings
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] = lambda piece: None
    on_done: Callable[[str | None, BaseException | None], None] = lambda text, error: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    stats: dict = field(default_factory=dict)  # filled by the decoding: tokens generated, finish reason


class Engine:
    """Serves ``model`` and ``tokenizer`` under ``name`` (see the module docstring)."""

    def __init__(self, model, tokenizer, name: str, max_queue: int = 16):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.worker = threading.Thread(target=self._work, name="helmlm-decode", daemon=True)
        self.worker.start()

    def check(self, prompt_ids: list[int], settings: SamplingSettings) -> None:
        """Refuse, before queueing, a request that cannot run (bad settings, a prompt too long for the context)."""
        settings.validate()
        check_request(self.model, [prompt_ids], settings)

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ServerBusy(f"the server is busy: {self.jobs.maxsize} requests are waiting; retry later") from None

    def _work(self) -> None:
        import torch

        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set():
                continue

            def on_text(piece: str, job: Job = job) -> None:
                if job.cancelled.is_set():
                    raise CancelledError  # the client went away: stop decoding for it
                job.on_text(piece)

            try:
                with torch.inference_mode():
                    text = complete(self.model, self.tokenizer, job.prompt_ids, job.settings, job.stop, on_text,
                                    stats=job.stats)
            except Exception as err:  # reported to the request that caused it (CancelledError too); the worker goes on
                job.on_done(None, err)
            else:
                job.on_done(text, None)

    def close(self) -> None:
        """Finish the queued requests, then stop the worker."""
        self.jobs.put(None)
        self.worker.join()
