"""The DIS flow cache: each image pair's flows computed once, both directions shared, bounded memory."""

from __future__ import annotations

import numpy as np
import torch

from slam.flowcache import FlowCache
from v2d.data.synthetic import render_sequence
from v2d.flow import DISOptions, dis_flow, dis_targets, fb_targets


def _images():
    seq = render_sequence(seed=5, num_frames=4, height=64, width=96)
    return [np.ascontiguousarray(im) for im in np.asarray(seq.images)]


def test_targets_equal_dis_targets_and_the_reverse_edge_reuses_both_flows():
    ims = _images()
    cache = FlowCache(DISOptions(), torch.device("cpu"), max_bytes=2**30)
    t, w = cache.targets(0, 2, ims[0], ims[2])
    ref_t, ref_w = dis_targets(ims[0], ims[2])
    assert torch.equal(t, ref_t) and torch.equal(w, ref_w)
    assert cache.flows_computed == 2  # 0 -> 2 and 2 -> 0
    t2, w2 = cache.targets(2, 0, ims[2], ims[0])
    ref_t2, ref_w2 = dis_targets(ims[2], ims[0])
    assert torch.equal(t2, ref_t2) and torch.equal(w2, ref_w2)
    assert cache.flows_computed == 2  # the reverse edge computed no flow
    assert cache.targets(0, 2, ims[0], ims[2])[0] is t  # a hit returns the cached tensors
    assert cache.pairs() == {(0, 2), (2, 0)}  # raw flows dropped once both directions' targets exist


def test_drop_and_memory_bound():
    ims = _images()
    cache = FlowCache(DISOptions(), torch.device("cpu"), max_bytes=2**30)
    cache.targets(0, 1, ims[0], ims[1])
    cache.targets(1, 2, ims[1], ims[2])
    cache.drop(lambda f: f != 0)
    assert {p for p in cache.pairs() if 0 in p} == set() and (1, 2) in cache.pairs()
    one = 64 * 96 * 2 * 4  # a raw flow; targets + weights are twice that
    small = FlowCache(DISOptions(), torch.device("cpu"), max_bytes=4 * one)
    small.targets(0, 1, ims[0], ims[1])  # 2 flows + targets = 4 units
    small.targets(2, 3, ims[2], ims[3])  # another 4: the oldest entries go
    assert (2, 3) in small.pairs() and (0, 1) not in small.pairs()
    assert small.targets(0, 1, ims[0], ims[1])[0].shape == (64, 96, 2)  # recomputed after eviction


def test_guided_targets_search_around_the_guess_once_per_pair():
    ims = _images()
    cache = FlowCache(DISOptions(), torch.device("cpu"), max_bytes=2**30)
    calls = []

    def guess():
        calls.append(1)
        return np.full((64, 96, 2), 1.5, np.float32), np.full((64, 96, 2), -1.5, np.float32)

    t, w = cache.guided_targets(0, 3, ims[0], ims[3], guess)
    fwd = dis_flow(ims[0], ims[3], "medium", np.full((64, 96, 2), 1.5, np.float32))
    bwd = dis_flow(ims[3], ims[0], "medium", np.full((64, 96, 2), -1.5, np.float32))
    ref_t, ref_w = fb_targets(fwd, bwd)
    assert torch.equal(t, ref_t) and torch.equal(w, ref_w)
    back, _ = cache.guided_targets(3, 0, ims[3], ims[0], guess)  # the reverse direction came with it
    assert torch.equal(back, fb_targets(bwd, fwd)[0])
    assert cache.guided_targets(0, 3, ims[0], ims[3], guess)[0] is t
    assert len(calls) == 1 and cache.flows_computed == 2
    cache.targets(0, 3, ims[0], ims[3])  # the unguided flows are kept apart: computed now
    assert cache.flows_computed == 4
    cache.drop(lambda f: f != 3)
    assert cache.pairs() == set()
