"""DropPath: whole samples are dropped, survivors rescaled so the expectation is kept; off in eval."""

from __future__ import annotations

import pytest
import torch

from visattn.nn import DropPath


def test_drops_whole_samples_and_rescales_survivors() -> None:
    torch.manual_seed(0)
    m = DropPath(0.25).train()
    x = torch.randn(256, 3, 4, 5).abs() + 0.1  # no zeros, so a dropped sample is recognizable
    y = m(x)
    dropped = (y == 0).flatten(1).all(1)
    kept = torch.isclose(y, x / 0.75).flatten(1).all(1)
    assert bool((dropped ^ kept).all()), "every sample is either dropped whole or kept whole, scaled by 1/(1-p)"
    assert 0.15 < dropped.float().mean().item() < 0.35


def test_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    m = DropPath(0.5).train()
    x = torch.ones(20000, 2)
    assert m(x).mean().item() == pytest.approx(1.0, abs=0.03)


def test_identity_in_eval_and_at_zero() -> None:
    x = torch.randn(4, 8)
    assert DropPath(0.9).eval()(x) is x
    assert DropPath(0.0).train()(x) is x


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_rejects_probabilities_outside_0_1(p) -> None:
    with pytest.raises(ValueError, match=r"DropPath: p=.* must be in \[0, 1\)"):
        DropPath(p)
