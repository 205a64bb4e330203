"""Every backend against the loop oracle (``brute.py``) on the "beyond NATTEN" features: relative
positional bias, additive bias, key padding mask, attention weights, variable resolution, keys on
another grid (cross-grid) and periodic axes, forward (out, LSE, weights) and backward (q, k, v, rpb,
attn_bias, gradients flowing through the weights). A backend that refuses a feature must be routed
around by automatic selection. The harness is ``run_feature_parity`` in tests/parity.py."""

from __future__ import annotations

import pytest
import torch

from cases import FEATURE_CASES, FeatureCase
from parity import run_feature_parity
from visattn.backends import list_backends


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=str)
@pytest.mark.parametrize("backend", list_backends())
def test_feature_parity(backend: str, case: FeatureCase, dtype: torch.dtype) -> None:
    run_feature_parity(backend, case, dtype)
