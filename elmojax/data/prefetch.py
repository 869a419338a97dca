"""Batches read ahead in a background thread, so that the devices never wait for the host."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Optional


class BatchPrefetcher:
    """Reads batches in a background thread so the device never waits for the host.

    Yields (batch, data position after it): the position saved with a checkpoint must be that
    of the last batch trained on, not of the batches read ahead. Once `prepare` is set (a
    function of a batch), it yields prepare(batch) instead, made in the thread for the batches
    read after that.
    """

    def __init__(self, dataset, depth: int = 4):
        self.prepare: Optional[Callable] = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(dataset,), daemon=True)
        self._thread.start()

    def _work(self, dataset) -> None:
        try:
            for batch in dataset.iter_batches():
                prepare = self.prepare
                if not self._put((batch if prepare is None else prepare(batch), dataset.state_dict(), prepare)):
                    return
            self._put(StopIteration())
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, position, prepared_by = item
        if self.prepare is not prepared_by:  # read before `prepare` was set
            batch = self.prepare(batch)
        return batch, position

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
