"""``natten.NeighborhoodAttention{1,2,3}D`` of every release: constructors read by release, state-dict keys
as NATTEN's (official NAT/DiNAT checkpoints load by key), zero padding of small inputs up to 0.15, 0.17's
fused switch, and the explanation given for a checkpoint whose bias table does not fit the module."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import visattn
from visattn.compat import natten as N
from visattn.compat.natten import _versions


def _same_weights(src: nn.Module, dst: nn.Module) -> nn.Module:
    dst.load_state_dict(src.state_dict())
    return dst


@pytest.mark.parametrize("build, rpb, era", [
    (lambda: N.NeighborhoodAttention2D(32, 4, 5), False, "0.20"),
    (lambda: N.NeighborhoodAttention2D(embed_dim=32, num_heads=4, kernel_size=5, stride=2), False, "0.20"),
    (lambda: N.NeighborhoodAttention2D(dim=32, num_heads=4, kernel_size=5, bias=True), True, "0.15"),
    (lambda: N.NeighborhoodAttention2D(32, 4, 5, 2, rel_pos_bias=True), True, "0.17"),
    (lambda: N.NeighborhoodAttention2D(32, 4, 5, dilation=2, attn_drop=0.1, bias=False), False, "0.15"),
    (lambda: N.NeighborhoodAttention1D(32, 4, 5, is_causal=True), False, "0.20"),
    (lambda: N.NeighborhoodAttention3D(32, 4, 3, 5, bias=True), True, "0.15"),
    (lambda: N.NeighborhoodAttention3D(32, 4, (5, 3, 3), rel_pos_bias=True), True, "0.17"),
])
def test_constructors_of_every_release(build, rpb: bool, era: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (32, 4, 5) alone is read as 0.20+ with a warning: tested below
        module = build()
    assert module.natten_era == era and (module.rpb is not None) == rpb
    keys = {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"} | ({"rpb"} if rpb else set())
    assert set(module.state_dict()) == keys


def test_014_positional_order_needs_its_pin() -> None:
    _versions.pin("0.14.4")
    m = N.NeighborhoodAttention2D(32, 5, 4)  # (dim, kernel_size, num_heads) in 0.14.1-0.14.4
    assert (m.num_heads, m.kernel_size, m.rpb is not None) == (4, (5, 5), True)
    with pytest.warns(DeprecationWarning, match="NeighborhoodAttention has been deprecated"):
        old = N.NeighborhoodAttention(32, 5, 4)
    assert old.num_heads == 4
    _versions.pin(None)
    with pytest.warns(DeprecationWarning):
        assert N.NeighborhoodAttention(32, 5, 4).num_heads == 4  # the alias only ever had that order


def test_an_ambiguous_default_warns_once_and_the_pin_decides() -> None:
    with pytest.warns(UserWarning, match=r"NeighborhoodAttention1D: NATTEN 0\.14\.5-0\.15\.1, NATTEN 0\.17\.0-0\.17\.5 "
                                         r"would build this with other defaults .*built as NATTEN 0\.20\.1-0\.21\.7"):
        assert N.NeighborhoodAttention1D(16, 2, 3).rpb is None
    _versions.pin("0.15.1")
    assert N.NeighborhoodAttention1D(16, 2, 3).rpb is not None  # 0.15: bias=True by default
    _versions.pin("0.17.5")
    assert N.NeighborhoodAttention1D(16, 2, 3).rpb is None
    with pytest.raises(TypeError, match=r"NeighborhoodAttention2D: this call means different things .*dilation"):
        _versions.pin(None)
        N.NeighborhoodAttention2D(16, 2, 3, 2)  # 4th positional: dilation up to 0.17, stride from 0.20


def test_017_refuses_causal_with_bias_as_natten_did() -> None:
    with pytest.raises(NotImplementedError, match="Causal neighborhood attention is undefined with positional biases"):
        N.NeighborhoodAttention2D(16, 2, 3, is_causal=True, rel_pos_bias=True)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_forward_equals_visattn_module(rank: int) -> None:
    ours = {1: visattn.NeighborhoodAttention1D, 2: visattn.NeighborhoodAttention2D,
            3: visattn.NeighborhoodAttention3D}[rank](24, 3, 3, dilation=2, rel_pos_bias=True)
    legacy = _same_weights(ours, getattr(N, f"NeighborhoodAttention{rank}D")(24, 3, 3, dilation=2, rel_pos_bias=True))
    x = torch.randn(2, *(7, 8, 6)[:rank], 24)
    torch.testing.assert_close(legacy(x), ours(x))


def test_015_zero_pads_small_inputs_like_natten() -> None:
    legacy = N.NeighborhoodAttention2D(16, 2, 3, dilation=3, bias=True)  # window 9 > 5 x 7 input
    x = torch.randn(1, 5, 7, 16)
    padded = nn.functional.pad(x, (0, 0, 0, 2, 0, 4))  # zeros at the end of H and W, before qkv
    plain = _same_weights(legacy, visattn.NeighborhoodAttention2D(16, 2, 3, dilation=3, rel_pos_bias=True))
    torch.testing.assert_close(legacy(x), plain(padded)[:, :5, :7])
    assert not torch.allclose(legacy(x), plain(x))  # visattn's own rule would differ


def test_017_fused_switch_skips_attention_dropout(caplog) -> None:
    m = N.NeighborhoodAttention2D(16, 2, 3, attn_drop=0.5, rel_pos_bias=True).train()
    x = torch.randn(1, 6, 6, 16)
    torch.manual_seed(0)
    assert not torch.equal(m(x), m(x))  # unfused path: dropout applied
    N.use_fused_na(True)
    with caplog.at_level(logging.ERROR, logger="natten"):
        assert torch.equal(m(x), m(x))
    assert "does not apply attention dropout" in caplog.text


def test_official_nat_state_dict_loads_by_key() -> None:
    """The layout of official NAT/DiNAT checkpoints (``levels.{i}.blocks.{j}.attn.{qkv,rpb,proj}``), built
    the three ways the official code built its attention: 0.14's ``NeighborhoodAttention`` (under a
    0.14 pin), ``bias=True`` before 0.17 and ``rel_pos_bias=True`` after."""
    C, heads, k = 32, 2, 7
    official = {"levels.0.blocks.0.attn.qkv.weight": torch.randn(3 * C, C), "levels.0.blocks.0.attn.qkv.bias":
                torch.randn(3 * C), "levels.0.blocks.0.attn.rpb": torch.randn(heads, 2 * k - 1, 2 * k - 1),
                "levels.0.blocks.0.attn.proj.weight": torch.randn(C, C),
                "levels.0.blocks.0.attn.proj.bias": torch.randn(C)}

    def nested(attn: nn.Module) -> nn.Module:
        block = nn.Module()
        block.attn = attn
        level = nn.Module()
        level.blocks = nn.ModuleList([block])
        root = nn.Module()
        root.levels = nn.ModuleList([level])
        return root

    _versions.pin("0.14.4")
    with pytest.warns(DeprecationWarning):
        builds = [N.NeighborhoodAttention(C, kernel_size=k, num_heads=heads, qkv_bias=True, qk_scale=None,
                                          attn_drop=0.0, proj_drop=0.0, dilation=2)]
    _versions.pin(None)
    kw = dict(kernel_size=k, dilation=2, num_heads=heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0)
    builds += [N.NeighborhoodAttention2D(C, bias=True, **kw), N.NeighborhoodAttention2D(C, rel_pos_bias=True, **kw)]
    x = torch.randn(1, 14, 14, C)
    ref = visattn.NeighborhoodAttention2D(C, heads, k, dilation=2, rel_pos_bias=True)
    ref.load_state_dict({key.removeprefix("levels.0.blocks.0.attn."): v for key, v in official.items()})
    for attn in builds:
        nested(attn).load_state_dict(official)  # strict: same keys and shapes
        torch.testing.assert_close(attn(x), ref(x))


def test_a_checkpoint_whose_bias_does_not_fit_the_module() -> None:
    no_bias = N.NeighborhoodAttention2D(embed_dim=16, num_heads=2, kernel_size=3)
    with_bias = N.NeighborhoodAttention2D(16, 2, 3, bias=True)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"rpb\""), \
            pytest.warns(UserWarning, match=r"has relative positional bias table 'rpb' but it was built without one: "
                                            r"NATTEN <= 0\.15 made one by default \(bias=True\)"):
        no_bias.load_state_dict(with_bias.state_dict())
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"rpb\""), \
            pytest.warns(UserWarning, match="has no relative positional bias table 'rpb' but the module has one"):
        with_bias.load_state_dict(no_bias.state_dict())


def test_module_paths_of_every_release() -> None:
    assert N.natten2d.NeighborhoodAttention2D is N.NeighborhoodAttention2D  # 0.14-0.17
    assert N.na3d.NeighborhoodAttention3D is N.NeighborhoodAttention3D       # 0.17
    assert N.modules.NeighborhoodAttention1D is N.NeighborhoodAttention1D    # 0.20+
    assert N.nattencuda.NeighborhoodAttention is N.NeighborhoodAttention     # 0.14.1
    q = torch.randn(1, 6, 6, 2, 4)
    torch.testing.assert_close(N.na2d(q, q, q, 3), visattn.na2d(q, q, q, 3))  # the module path is also the function
