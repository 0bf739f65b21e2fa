"""Replaying a fixed-shape step as CUDA graphs: one graph per key, captured when first needed.

Capture records the kernels of ``step(*key)`` without running them; torch asks for an eager warm-up first (lazy
kernel and handle set-up) on a side stream. The warm-up does run, so it is rolled back: ``snapshot`` saves and
``restore`` puts back the state it changed. Its writes into the caches are not undone: they land where the real step
writes next, before anything reads them. All graphs share one memory pool and live until ``release``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["GraphRunner", "rolled_back"]

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream of the warm-ups before capture: one per device for the process. cuBLAS keeps a workspace for every
    stream it has run on, allocated through torch's caching allocator and never returned; a fresh stream per capture
    left its workspace behind per graph, until torch's pool of 32 streams came round."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def rolled_back(step: Callable[..., None], snapshot: Callable[[], Any], restore: Callable[[Any], None], key) -> None:
    """Run ``step(*key)`` and put back the state ``snapshot`` saved."""
    saved = snapshot()
    step(*key)
    restore(saved)


class GraphRunner:
    """``replay(key)`` runs ``step(*key)`` as a CUDA graph on ``device``, capturing it the first time."""

    def __init__(
        self,
        step: Callable[..., None],
        snapshot: Callable[[], Any],
        restore: Callable[[Any], None],
        device: torch.device,
    ):
        self.step, self.snapshot, self.restore = step, snapshot, restore
        self.device = torch.device(device)
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.captured = 0
        self.capture_seconds = 0.0

    def replay(self, key: tuple) -> None:
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key)
        graph.replay()

    def _capture(self, key: tuple) -> torch.cuda.CUDAGraph:
        start = time.perf_counter()
        side = _side_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            rolled_back(self.step, self.snapshot, self.restore, key)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        saved = self.snapshot()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step(*key)
        self.restore(saved)  # capture records without running; this only guards against a backend that runs
        self.graphs[key] = graph
        self.captured += 1
        self.capture_seconds += time.perf_counter() - start
        return graph

    def release(self) -> None:
        self.graphs.clear()
        self.pool = None
