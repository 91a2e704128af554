"""Network building blocks: hourglasses keep shapes, encoders reduce to 1/4, gradients reach every weight."""

from __future__ import annotations

import pytest
import torch

from v2d.nets.blocks import Hourglass, StackedHourglass
from v2d.nets.encoder import FeatureEncoder, Stem


@pytest.mark.parametrize("dims, shape", [(2, (2, 8, 16, 24)), (3, (1, 8, 8, 16, 16))])
def test_hourglass_keeps_shape_and_trains(dims, shape):
    torch.manual_seed(0)
    hg = StackedHourglass(dims, 8, stacks=2, levels=3, expand=4)
    x = torch.randn(shape)
    outs = hg(x)
    assert len(outs) == 2 and all(o.shape == x.shape for o in outs)
    sum(o.square().mean() for o in outs).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hg.parameters())


def test_hourglass_is_deterministic_with_a_seed():
    x = torch.randn(1, 4, 8, 8)
    torch.manual_seed(1)
    a = Hourglass(2, 4, levels=2, expand=2)(x)
    torch.manual_seed(1)
    b = Hourglass(2, 4, levels=2, expand=2)(x)
    assert torch.equal(a, b)


def test_encoders_reduce_to_a_quarter():
    x = torch.randn(2, 3, 64, 96)
    assert Stem(8, 16)(x).shape == (2, 16, 16, 24)
    assert FeatureEncoder(8, 16, out_channels=12, stacks=1, levels=2, expand=4)(x).shape == (2, 12, 16, 24)
