"""Each image pair's DIS flow computed once: raw flows and forward-backward targets, by frame index.

Tracking frame f against keyframe k needs the flows k -> f and f -> k; when f later becomes a
keyframe, the window optimisation and the bundle adjustment need the same two flows again (as the
edges k -> f and f -> k), and every pair of window keyframes serves up to `slam.window` windows.
OpenCV DIS dominates the per-frame cost of tracking, so the cache keys both the raw flows (a -> b)
and the combined targets (`v2d.flow.fb_targets`) by ordered frame pair, and the edge b -> a reuses
the raw flows of a -> b.

Memory is bounded: entries are dropped explicitly when a frame can no longer be used (`drop`), and
the least recently used entries go when the total passes `max_bytes`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from v2d.flow import DISOptions, dis_flow, fb_targets

__all__ = ["FlowCache"]


class FlowCache:
    """DIS flows and targets keyed by ordered frame-index pairs; thread-safe.

    Args:
        opts: DIS settings (preset, forward-backward confidence).
        device: where returned targets and weights live.
        max_bytes: bound on the memory held (least recently used entries are dropped first).
    """

    def __init__(self, opts: DISOptions, device: torch.device, max_bytes: int) -> None:
        self.opts, self.device, self.max_bytes = opts, device, max_bytes
        self._lock = threading.Lock()
        # key: ("flow" | "targets", a, b) -> ndarray (H, W, 2) or (targets, weights)
        self._entries: OrderedDict[tuple[str, int, int], object] = OrderedDict()
        self._bytes = 0
        self.flows_computed = 0  # DIS calls made (for tests and profiles)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def pairs(self) -> set[tuple[int, int]]:
        """Ordered frame pairs (a, b) with a raw flow or targets held."""
        with self._lock:
            return {(a, b) for _, a, b in self._entries}

    def targets(self, a: int, b: int, image_a: np.ndarray, image_b: np.ndarray
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Targets of frame a's pixels in frame b and their forward-backward confidence.

        Shapes: image_a, image_b (H, W, 3) uint8 -> targets, weights (H, W, 2) float32 on the cache's
        device (`v2d.flow.fb_targets`).
        """
        hit = self._get(("targets", a, b))
        if hit is not None:
            return hit
        fwd = self._flow(a, b, lambda: dis_flow(image_a, image_b, self.opts.preset))
        bwd = self._flow(b, a, lambda: dis_flow(image_b, image_a, self.opts.preset))
        t, w = fb_targets(fwd, bwd, self.opts)
        out = (t.to(self.device), w.to(self.device))
        self._put(("targets", a, b), out, t.nbytes + w.nbytes)
        with self._lock:  # both directions' targets held: the raw flows have served their purpose
            if ("targets", b, a) in self._entries:
                for key in (("flow", a, b), ("flow", b, a)):
                    if key in self._entries:
                        self._bytes -= _nbytes(self._entries.pop(key))
        return out

    def guided_targets(self, a: int, b: int, image_a: np.ndarray, image_b: np.ndarray,
                       init: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `targets`, but DIS searched around a guess of the two flows (`init()` -> flows a -> b
        and b -> a, (H, W, 2) float32, called only when the pair is not cached yet): for pairs too far
        apart for a search from zero flow. Cached apart from the unguided flows."""
        hit = self._get(("guided", a, b))
        if hit is not None:
            return hit
        guess_ab, guess_ba = init()
        fwd = dis_flow(image_a, image_b, self.opts.preset, guess_ab)
        bwd = dis_flow(image_b, image_a, self.opts.preset, guess_ba)
        with self._lock:
            self.flows_computed += 2
        out = {}
        for key, (f0, f1) in ((("guided", a, b), (fwd, bwd)), (("guided", b, a), (bwd, fwd))):
            t, w = fb_targets(f0, f1, self.opts)
            out[key] = (t.to(self.device), w.to(self.device))
            self._put(key, out[key], t.nbytes + w.nbytes)
        return out[("guided", a, b)]

    def drop(self, keep: Callable[[int], bool], raw_only: bool = False) -> None:
        """Drop every entry that involves a frame for which `keep(frame)` is False (with `raw_only`,
        only the raw flows: the targets of a tracked frame serve the window, its raw flows only an
        edge starting at it, i.e. only if it becomes a keyframe)."""
        with self._lock:
            for key in [k for k in self._entries if not (keep(k[1]) and keep(k[2]))
                        and (k[0] == "flow" or not raw_only)]:
                self._bytes -= _nbytes(self._entries.pop(key))

    def _flow(self, a: int, b: int, compute: Callable[[], np.ndarray]) -> np.ndarray:
        key = ("flow", a, b)
        flow = self._get(key)
        if flow is None:
            flow = compute()
            with self._lock:
                self.flows_computed += 1
            self._put(key, flow, flow.nbytes)
        return flow

    def _get(self, key: tuple[str, int, int]):
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def _put(self, key: tuple[str, int, int], value: object, nbytes: int) -> None:
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = value
            self._bytes += nbytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                self._bytes -= _nbytes(old)


def _nbytes(value: object) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    t, w = value
    return t.nbytes + w.nbytes
