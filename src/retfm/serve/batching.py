"""Micro-batching: requests that arrive together share one forward pass.

Each request puts its item on an asyncio queue and awaits a future. One collector task takes the first waiting
item, then keeps taking items until ``max_batch`` are gathered or ``max_wait_ms`` has passed since the first,
and hands the batch to ``run_batch`` on a single worker thread (the model is used by one thread at a time, and
the event loop stays free to accept requests meanwhile). A lone request waits at most ``max_wait_ms``; under
load, batches fill before the wait ends and the wait costs nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class MicroBatcher:
    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch: int, max_wait_ms: float):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.batches = 0  # forward passes run, and the items they held: the mean batch size, for /healthz
        self.items = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retfm-model")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        """The result of ``run_batch`` for ``item``, computed together with whatever else is waiting."""
        if self._queue is None:
            raise RuntimeError("the batcher is not running (start it in the app's lifespan)")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        # A get() that timed out stays pending and starts the next batch: cancelling it (as wait_for does) could
        # drop an item that arrived in the same instant.
        getter: asyncio.Future | None = None
        while True:
            batch = [await (getter or asyncio.ensure_future(self._queue.get()))]
            getter = None
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                getter = asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait({getter}, timeout=remaining)
                if not done:
                    break
                batch.append(getter.result())
                getter = None
            batch = [(item, future) for item, future in batch if not future.cancelled()]  # clients gone
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [item for item, _ in batch])
            except Exception as exc:  # one failed pass fails its requests, never the collector
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
