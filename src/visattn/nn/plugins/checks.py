"""Argument and input checks shared by the channels-first CNN plug-ins (``se.py``, ``eca.py``, ...).

Every plug-in validates its constructor arguments and its input the same way, so the error text
(function, argument, value, rule, fix) reads the same across the zoo.
"""

from __future__ import annotations

import torch
from torch import nn


def check_positive_int(owner: str, arg: str, value: int) -> int:
    """``value`` as an int, or a ValueError naming ``owner`` and ``arg`` if it is not an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {arg}={value!r} must be an integer >= 1.")
    return value


def check_divisible(owner: str, arg: str, value: int, by_name: str, by: int) -> None:
    """Raise a ValueError if ``value`` (argument ``arg``) is not a multiple of ``by`` (``by_name``)."""
    if value % by:
        raise ValueError(
            f"{owner}: {arg}={value} must be divisible by {by_name}={by}; "
            f"pick {arg} as a multiple of {by} or change {by_name}."
        )


def check_choice(owner: str, arg: str, value, choices) -> None:
    """Raise a ValueError if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}: {arg}={value!r} is not one of {sorted(choices)!r}.")


def check_input(module: nn.Module, x: torch.Tensor, channels: int) -> None:
    """The plug-ins take channels-first feature maps ``[B, C, H, W]`` with ``C == channels``."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            f"{type(module).__name__}: expected a channels-first input [B, {channels}, H, W], got "
            f"{tuple(x.shape)}; a channels-last tensor [B, H, W, C] needs x.permute(0, 3, 1, 2)."
        )
