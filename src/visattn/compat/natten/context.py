"""``natten.context``: NATTEN's global switches (0.15-0.21) and capability checks.

* Capability checks (``has_cuda``, ``has_half``, ``has_bfloat``, ``has_gemm``, ``has_fna``/``has_fused_na``,
  ``has_tf32_gemm``/``has_fp32_gemm``, ``has_fp64_gemm``) answer for *this machine and visattn*: CUDA
  checks are about a visible CUDA GPU (visattn's portable backend runs every dtype there, its
  matmuls being PyTorch's); ``has_fused_na`` is true when a fused visattn backend can run here (the C
  kernels on CPU, Triton on CUDA). ``HAS_LIBNATTEN`` is False: there is no compiled NATTEN library.
* ``use_fused_na``/``use_fna`` change what 0.17-era modules do, as in NATTEN: fused attention, where
  attention dropout is not applied (NATTEN logged an error and skipped it; so does the stand-in).
* Every other switch is a tuning or kernel-selection setting of NATTEN's CUDA kernels: accepted,
  remembered (its ``is_*``/``get_*`` query returns what was set) and otherwise a no-op, because
  visattn chooses its own kernels and tiles, is deterministic on CPU, and has no Flex or autotuner path.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Optional

import torch

__all__ = [
    "HAS_LIBNATTEN", "MemoryUsagePreference", "allow_flex_compile", "allow_flex_compile_backprop",
    "are_deterministic_algorithms_enabled", "disable_autotuner", "disable_flex_compile",
    "disable_flex_compile_backprop", "disable_gemm_na", "disable_tf32", "disable_tiled_na", "enable_gemm_na",
    "enable_tf32", "enable_tiled_na", "force_flex_attention", "get_memory_usage_preference", "has_bfloat",
    "has_cuda", "has_fna", "has_fp32_gemm", "has_fp64_gemm", "has_fused_na", "has_gemm", "has_half",
    "has_tf32_gemm", "is_autotuner_enabled", "is_autotuner_enabled_for_backward", "is_autotuner_enabled_for_forward",
    "is_autotuner_thorough_for_backward", "is_autotuner_thorough_for_forward", "is_flex_compile_allowed",
    "is_flex_compile_backprop_allowed", "is_fna_enabled", "is_fused_na_enabled", "is_gemm_na_enabled",
    "is_kv_parallelism_in_fused_na_enabled", "is_memory_usage_default", "is_memory_usage_strict",
    "is_memory_usage_unrestricted", "is_tf32_in_gemm_na_enabled", "is_tiled_na_enabled", "set_memory_usage_preference",
    "should_force_flex_attention", "should_use_flex_attention", "use_autotuner", "use_deterministic_algorithms",
    "use_flex_attention", "use_fna", "use_fused_na", "use_gemm_na", "use_kv_parallelism_in_fused_na",
    "use_tf32_in_gemm_na", "use_tiled_na",
]

logger = logging.getLogger("natten")

HAS_LIBNATTEN = False


class MemoryUsagePreference(Enum):
    Default = 0
    Strict = 1
    Unrestricted = 2


class NattenContext:
    """The switches, with NATTEN's defaults (KV parallelism on since 0.20; fused NA off before 0.20,
    where modules had an unfused path)."""

    is_deterministic_mode_enabled: bool = False
    is_fused_na_enabled: bool = False
    is_kv_parallelism_enabled: bool = True
    use_flex_attention: bool = False
    force_flex_attention: bool = False
    training_memory_preference: MemoryUsagePreference = MemoryUsagePreference.Default
    flex_compile_allowed: bool = False
    flex_compile_backprop_allowed: bool = False
    tiled_na: bool = True
    gemm_na: bool = True
    tf32_in_gemm_na: bool = True
    autotuner: dict = {"forward_pass": False, "backward_pass": False, "thorough_mode_forward": False,
                       "thorough_mode_backward": False}

    @staticmethod
    def reset() -> None:
        for name, value in _DEFAULTS.items():
            setattr(NattenContext, name, dict(value) if isinstance(value, dict) else value)


_DEFAULTS = {k: dict(v) if isinstance(v, dict) else v for k, v in vars(NattenContext).items()
             if not k.startswith("_") and not isinstance(v, staticmethod)}


# ------------------------------------------------------------------------------------------------
# Capabilities

def _cc(device_index=None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index) if has_cuda() else (0, 0)


def has_cuda() -> bool:
    """A CUDA GPU is visible (visattn runs NA on it)."""
    return torch.cuda.is_available()


def has_half(device_index: Optional[int] = None) -> bool:
    """float16 NA on the CUDA GPU: true on every GPU (computed in float32 where no kernel takes half)."""
    return has_cuda()


def has_bfloat(device_index: Optional[int] = None) -> bool:
    """bfloat16 NA on the CUDA GPU: where PyTorch supports bfloat16 there (compute capability >= 8.0)."""
    return has_cuda() and _cc(device_index) >= (8, 0)


def has_gemm(device_index: Optional[int] = None) -> bool:
    """GEMM-based NA on the CUDA GPU: visattn's portable backend is batched GEMMs on every GPU."""
    return has_cuda()


def has_tf32_gemm(device_index: Optional[int] = None) -> bool:
    """TF32 matmuls on the CUDA GPU (compute capability >= 8.0)."""
    return has_cuda() and _cc(device_index) >= (8, 0)


has_fp32_gemm = has_tf32_gemm


def has_fp64_gemm(device_index: Optional[int] = None) -> bool:
    """float64 NA on the CUDA GPU: visattn's portable backend computes it on every GPU."""
    return has_cuda()


def has_fused_na(device_index: Optional[int] = None) -> bool:
    """A fused visattn backend runs on this machine: the C kernels on CPU (needs a C compiler) or
    Triton on a CUDA GPU."""
    from ...backends import why_not

    return why_not("cpu") is None or (has_cuda() and why_not("triton") is None)


has_fna = has_fused_na


# ------------------------------------------------------------------------------------------------
# Switches that change what modules do

def use_fused_na(mode: bool = True, kv_parallel: bool = True, use_flex_attention: bool = False,
                 force_flex_attention: bool = False) -> None:
    """0.17: modules run fused attention (no attention dropout) instead of qk -> softmax -> av."""
    NattenContext.is_fused_na_enabled = bool(mode)
    NattenContext.use_flex_attention = bool(mode and use_flex_attention)
    NattenContext.force_flex_attention = bool(mode and force_flex_attention)
    use_kv_parallelism_in_fused_na(bool(mode and kv_parallel))


use_fna = use_fused_na


def is_fused_na_enabled() -> bool:
    return NattenContext.is_fused_na_enabled


is_fna_enabled = is_fused_na_enabled


def use_flex_attention() -> None:
    """0.17.5: fused NA through Flex Attention; here fused NA (visattn has no Flex path)."""
    use_fused_na(True, use_flex_attention=True)


def force_flex_attention() -> None:
    use_fused_na(True, use_flex_attention=True, force_flex_attention=True)


def should_use_flex_attention() -> bool:
    return NattenContext.use_flex_attention


def should_force_flex_attention() -> bool:
    return NattenContext.force_flex_attention


# ------------------------------------------------------------------------------------------------
# Tuning switches: remembered, no effect

def use_deterministic_algorithms(mode: bool = True) -> None:
    """Remembered; visattn's CPU kernels are deterministic regardless."""
    NattenContext.is_deterministic_mode_enabled = bool(mode)


def are_deterministic_algorithms_enabled() -> bool:
    return NattenContext.is_deterministic_mode_enabled


def use_kv_parallelism_in_fused_na(mode: bool = True) -> None:
    NattenContext.is_kv_parallelism_enabled = bool(mode)


def is_kv_parallelism_in_fused_na_enabled() -> bool:
    return NattenContext.is_kv_parallelism_enabled


def set_memory_usage_preference(pref: str = "default") -> None:
    prefs = {"default": MemoryUsagePreference.Default, "strict": MemoryUsagePreference.Strict,
             "unrestricted": MemoryUsagePreference.Unrestricted}
    if pref not in prefs:
        raise ValueError(f"set_memory_usage_preference: pref={pref!r}; choose 'default', 'strict' or 'unrestricted' "
                         f"(as NATTEN).")
    NattenContext.training_memory_preference = prefs[pref]


def get_memory_usage_preference() -> MemoryUsagePreference:
    return NattenContext.training_memory_preference


def is_memory_usage_default() -> bool:
    return get_memory_usage_preference() == MemoryUsagePreference.Default


def is_memory_usage_strict() -> bool:
    return get_memory_usage_preference() == MemoryUsagePreference.Strict


def is_memory_usage_unrestricted() -> bool:
    return get_memory_usage_preference() == MemoryUsagePreference.Unrestricted


def allow_flex_compile(mode: bool = True, backprop: bool = False) -> None:
    NattenContext.flex_compile_allowed = bool(mode)
    NattenContext.flex_compile_backprop_allowed = bool(mode and backprop)


def allow_flex_compile_backprop(mode: bool = True) -> None:
    allow_flex_compile(is_flex_compile_allowed(), mode)


def disable_flex_compile() -> None:
    allow_flex_compile(False)


def disable_flex_compile_backprop() -> None:
    allow_flex_compile(is_flex_compile_allowed(), False)


def is_flex_compile_allowed() -> bool:
    return NattenContext.flex_compile_allowed


def is_flex_compile_backprop_allowed() -> bool:
    return NattenContext.flex_compile_backprop_allowed


def use_autotuner(forward_pass: Optional[bool] = None, backward_pass: Optional[bool] = None,
                  thorough_mode_forward: Optional[bool] = None, thorough_mode_backward: Optional[bool] = None,
                  warmup_steps_forward: Optional[int] = None, warmup_steps_backward: Optional[int] = None,
                  steps_forward: Optional[int] = None, steps_backward: Optional[int] = None) -> None:
    """0.17's autotuner for the fused CUDA kernels: remembered, no effect (visattn picks its tiles)."""
    for name, value in (("forward_pass", forward_pass), ("backward_pass", backward_pass),
                        ("thorough_mode_forward", thorough_mode_forward),
                        ("thorough_mode_backward", thorough_mode_backward)):
        if value is not None:
            NattenContext.autotuner[name] = bool(value)


def disable_autotuner() -> None:
    use_autotuner(False, False, False, False)


def is_autotuner_enabled() -> bool:
    return is_autotuner_enabled_for_forward() or is_autotuner_enabled_for_backward()


def is_autotuner_enabled_for_forward() -> bool:
    return NattenContext.autotuner["forward_pass"]


def is_autotuner_enabled_for_backward() -> bool:
    return NattenContext.autotuner["backward_pass"]


def is_autotuner_thorough_for_forward() -> bool:
    return NattenContext.autotuner["thorough_mode_forward"]


def is_autotuner_thorough_for_backward() -> bool:
    return NattenContext.autotuner["thorough_mode_backward"]


def use_tiled_na(mode: bool = True) -> None:
    NattenContext.tiled_na = bool(mode)


def is_tiled_na_enabled() -> bool:
    return NattenContext.tiled_na


def use_gemm_na(mode: bool = True) -> None:
    NattenContext.gemm_na = bool(mode)


def is_gemm_na_enabled() -> bool:
    return NattenContext.gemm_na


def use_tf32_in_gemm_na(mode: bool = True) -> None:
    NattenContext.tf32_in_gemm_na = bool(mode)


def is_tf32_in_gemm_na_enabled() -> bool:
    return NattenContext.tf32_in_gemm_na


# 0.15's enable_*/disable_* (return the new state; the tf32 ones only where TF32 exists, as NATTEN).

def enable_tf32() -> bool:
    if has_tf32_gemm():
        use_tf32_in_gemm_na(True)
        return is_tf32_in_gemm_na_enabled()
    return False


def disable_tf32() -> bool:
    if has_tf32_gemm():
        use_tf32_in_gemm_na(False)
        return is_tf32_in_gemm_na_enabled()
    return False


def enable_gemm_na() -> bool:
    use_gemm_na(True)
    return is_gemm_na_enabled()


def disable_gemm_na() -> bool:
    use_gemm_na(False)
    return is_gemm_na_enabled()


def enable_tiled_na() -> bool:
    use_tiled_na(True)
    return is_tiled_na_enabled()


def disable_tiled_na() -> bool:
    use_tiled_na(False)
    return is_tiled_na_enabled()
