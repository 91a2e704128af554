"""The DIS flow cache: each image pair's flows computed once, both directions shared, bounded memory."""

from __future__ import annotations

import numpy as np
import torch

from slam.flowcache import FlowCache
from v2d.data.synthetic import render_sequence
from v2d.flow import DISOptions, dis_targets


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
