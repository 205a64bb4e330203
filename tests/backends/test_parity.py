"""Every backend against the float64 oracle over the whole case sweep (the harness is tests/parity.py)."""

from __future__ import annotations

import pytest
import torch

from cases import CASES, Case
from parity import run_parity, usable
from visattn.backends import list_backends

DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", list_backends())
def test_parity(backend: str, case: Case, dtype: torch.dtype) -> None:
    usable(backend)
    run_parity(backend, case, dtype)
