"""Hugging Face DiNAT through the NATTEN stand-in, against visattn's own DiNAT with the same weights.

``DinatModel``, ``DinatForImageClassification`` and ``DinatBackbone`` run forward and backward on CPU
with ``natten`` resolved to :mod:`visattn.compat.natten`, and equal :func:`nat_from_hf_dinat`'s visattn
model (fp32, 1e-5) wherever every window fits its map.

transformers 4.54 changed DiNAT's attention so that it no longer hands NATTEN a heads-first tensor
(4.54-4.57 fail unpacking a 4-D shape as 3-D; 5.x passes ``[B, W, H, heads, d]`` where NATTEN expects
``[B, heads, H, W, d]``), whatever NATTEN is installed. For those releases the tests check that the
stand-in refuses that layout with its error (a real NATTEN would compute attention over the wrong
axes when the heads outnumber the window), then run the models with that one step restored
(:func:`visattn.compat.hf_dinat.fix_transformers_dinat`: the attention's forward with
``.permute(0, 3, 1, 2, 4)`` as before 4.54). With transformers <= 4.53 the models run unmodified (CI
runs this file once more with 4.53.3).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import warnings

import pytest
import torch

from visattn.compat import natten_stand_in, real_natten
from visattn.compat.hf_dinat import (
    LAYOUT_CHANGED_IN,
    convert_hf_dinat_state_dict,
    dinat_attention_forward,
    fix_transformers_dinat,
    nat_from_hf_dinat,
    nat_kwargs_from_hf_config,
)

if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed (pip install 'visattn[compat]')", allow_module_level=True)

_VERSION = tuple(int(x) for x in importlib.metadata.version("transformers").split(".")[:2])
#: transformers releases whose DiNAT passes NATTEN a wrongly laid out tensor (see the module docstring)
_LAYOUT_BUG = _VERSION >= LAYOUT_CHANGED_IN

SMALL = dict(embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], kernel_size=3,
             dilations=[[1], [1, 2], [1], [1]], drop_path_rate=0.0, layer_scale_init_value=0.5)
SIZE = 96  # stage maps 24, 12, 6, 3: every window (kernel * dilation) fits


@pytest.fixture
def dinat(monkeypatch):
    """transformers' ``modeling_dinat``, imported with ``natten`` resolved to the stand-in (replacing a
    real NATTEN for the test's duration if one is installed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the replace=True notice
        with natten_stand_in(replace=real_natten() is not None):
            import transformers.utils.import_utils as iu

            if hasattr(iu.is_natten_available, "cache_clear"):  # 5.x caches the answer
                iu.is_natten_available.cache_clear()
            if hasattr(iu, "_natten_available"):  # <= 4.x computes it when imported
                monkeypatch.setattr(iu, "_natten_available", True)
            name = "transformers.models.dinat.modeling_dinat"
            md = importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)
            assert md.natten2dqkrpb.__module__ == "visattn.compat.natten.functional"
            yield md


@pytest.fixture
def runnable(dinat, monkeypatch):
    """``modeling_dinat`` whose DiNAT runs: unmodified up to transformers 4.53, with the layout restored after."""
    if _LAYOUT_BUG:
        # (monkeypatch puts the original forward back after the test)
        monkeypatch.setattr(dinat.NeighborhoodAttention, "forward", dinat.NeighborhoodAttention.forward)
        assert fix_transformers_dinat() and dinat.NeighborhoodAttention.forward is dinat_attention_forward
    else:
        assert not fix_transformers_dinat()
    return dinat


def _model(md, cls: str, **config):
    torch.manual_seed(0)
    model = getattr(md, cls)(md.DinatConfig(**{**SMALL, **config}))
    with torch.no_grad():  # non-trivial weights everywhere (the bias tables start at zero)
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _output(cls: str, out):
    return {"DinatModel": lambda o: o.pooler_output, "DinatForImageClassification": lambda o: o.logits,
            "DinatBackbone": lambda o: list(o.feature_maps)}[cls](out)


CLASSES = [("DinatModel", {}), ("DinatForImageClassification", dict(num_labels=7)),
           ("DinatBackbone", dict(out_features=["stage1", "stage2", "stage3", "stage4"])),
           ("DinatBackbone", dict(out_features=["stage2", "stage4"]))]


@pytest.mark.parametrize("cls, config", CLASSES, ids=lambda c: str(c))
def test_hf_dinat_equals_visattn_dinat(runnable, cls: str, config: dict) -> None:
    hf = _model(runnable, cls, **config).eval()
    ours = nat_from_hf_dinat(hf).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        got, want = _output(cls, hf(x)), ours(x)
    for a, b in zip(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls, config", CLASSES[:3], ids=lambda c: str(c))
def test_hf_dinat_trains_through_the_stand_in(runnable, cls: str, config: dict) -> None:
    hf = _model(runnable, cls, **config).train()
    x = torch.randn(2, 3, SIZE, SIZE, requires_grad=True)
    out = _output(cls, hf(x))
    sum(o.square().sum() for o in (out if isinstance(out, list) else [out])).backward()
    rpbs = [p for n, p in hf.named_parameters() if n.endswith("attention.self.rpb")]
    assert rpbs and all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in rpbs)
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.skipif(not _LAYOUT_BUG, reason="this transformers' DiNAT passes NATTEN heads-first tensors")
def test_the_layout_bug_is_refused_with_the_stand_in_error(dinat) -> None:
    model = _model(dinat, "DinatModel").eval()
    match = r"natten2dqkrpb: .*heads-last, that axis holds the heads" if _VERSION >= (5, 0) else ""
    with pytest.raises(ValueError, match=match):
        model(torch.randn(1, 3, SIZE, SIZE))


def test_dinat_tiny_config_at_224(runnable) -> None:
    """DiNAT-Tiny (as published: 64 channels, depths 3-4-18-5, kernel 7, dilations to fill the map)."""
    from visattn.models.nat import dinat_dilations

    config = dict(embed_dim=64, depths=[3, 4, 18, 5], num_heads=[2, 4, 8, 16], kernel_size=7, mlp_ratio=3.0,
                  dilations=dinat_dilations((3, 4, 18, 5), 7, 224), layer_scale_init_value=0.0, drop_path_rate=0.0,
                  num_labels=1000)
    hf = runnable.DinatForImageClassification(runnable.DinatConfig(**config)).eval()
    ours = nat_from_hf_dinat(hf).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # (the backward is exercised on the small configs above)
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-5, rtol=1e-5)


def test_state_dict_mapping_is_complete(dinat) -> None:
    hf = _model(dinat, "DinatForImageClassification", num_labels=3)
    converted = convert_hf_dinat_state_dict(hf.state_dict())
    from visattn.models.nat import NAT

    target = NAT(**nat_kwargs_from_hf_config(hf.config)).state_dict()
    assert sorted(converted) == sorted(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    with pytest.raises(KeyError, match="not in the Hugging Face DiNAT layout: extra.weight"):
        convert_hf_dinat_state_dict({**hf.state_dict(), "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="'stem', which visattn's NAT does not output"):
        nat_kwargs_from_hf_config(dinat.DinatConfig(**SMALL, out_features=["stem", "stage1"]), features_only=True)


def test_an_unmodified_hf_script_runs_under_the_runner(tmp_path) -> None:
    """``python -m visattn.compat.run --fix-transformers-dinat script.py``: no change to the script."""
    import subprocess

    script = tmp_path / "classify.py"
    script.write_text("import torch\nfrom transformers import DinatConfig, DinatForImageClassification\n"
                      f"config = DinatConfig(**{SMALL!r}, num_labels=3)\n"
                      "model = DinatForImageClassification(config)\n"
                      f"print(tuple(model(torch.randn(1, 3, {SIZE}, {SIZE})).logits.shape))\n")
    args = [sys.executable, "-m", "visattn.compat.run", "--fix-transformers-dinat", str(script)]
    if real_natten() is not None:
        args.insert(3, "--replace-natten")
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)  # PYTHONPATH etc. inherited
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(1, 3)"
