"""``visattn show`` and ``visattn.viz``: the data behind the pictures is the library's neighbourhood
(checked against the loop oracle's per-axis rule), attention maps are the module's weights on the
right pixels, and the commands write real PNG files."""

from __future__ import annotations

import itertools

import pytest
import torch

from brute import axis_args, axis_neighbors
from visattn.cli.main import main
from visattn.nn import NeighborhoodAttention2D
from visattn.viz import attention_map, default_queries, image_tokens, neighborhood_layers, synthetic_image

mpimg = pytest.importorskip("matplotlib.image", reason="matplotlib is not installed (pip install 'visattn[plot]')")


@pytest.mark.parametrize("shape, na", [
    ((12, 16), dict(kernel_size=5, dilation=2)),
    ((12, 16), dict(kernel_size=(4, 5), stride=(2, 3), dilation=(1, 2))),
    ((9, 7), dict(kernel_size=(3, 4), stride=(1, 2), is_causal=(True, False))),
    ((3, 20), dict(kernel_size=7, dilation=3)),  # variable resolution on both axes
    ((15,), dict(kernel_size=4, stride=2, dilation=2)),
])
def test_highlighted_cells_are_the_neighbourhood(shape, na) -> None:
    args = axis_args(na, len(shape))
    queries = [q for q, _ in default_queries(shape)] + [tuple(s - 1 for s in shape)]
    for q in queries:
        lay = neighborhood_layers(shape, q, **na)
        axes = [axis_neighbors(q[a], shape[a], *args[a]) for a in range(len(shape))]
        expected = torch.full(shape, -1, dtype=torch.int64)
        for combo in itertools.product(*(nb for _, nb in axes)):
            slot = 0
            for (k_eff, _), (s, _, _) in zip(axes, combo):
                slot = slot * k_eff + s
            expected[tuple(c for _, c, _ in combo)] = slot
        torch.testing.assert_close(lay.slot, expected, msg=f"query {q}")
        assert lay.same_stride_group[q] and lay.same_dilation_group[q]
        # Non-causal queries of one stride group share the window: the same highlighted cells.
        if not any(causal for *_, causal in args):
            for other in zip(*torch.nonzero(lay.same_stride_group, as_tuple=True)):
                other = tuple(int(o) for o in other)
                assert torch.equal(neighborhood_layers(shape, other, **na).attended, lay.attended)


def test_dilation_group_layer() -> None:
    lay = neighborhood_layers((6, 9), (1, 2), kernel_size=3, dilation=(2, 3))
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(9), indexing="ij")
    assert torch.equal(lay.same_dilation_group, (rows % 2 == 1) & (cols % 3 == 2))
    assert not (lay.attended & ~lay.same_dilation_group).any(), "keys come only from the query's group"


def test_default_queries_and_errors() -> None:
    assert [q for q, _ in default_queries((5, 9))] == [(0, 0), (0, 4), (2, 4)]
    assert [n for _, n in default_queries((1, 1))] == ["corner"]
    with pytest.raises(ValueError, match=r"query=\(5, 0\) is not a coordinate of shape \(5, 9\)"):
        neighborhood_layers((5, 9), (5, 0), 3)


def test_attention_map_is_the_module_weights_on_the_right_tokens() -> None:
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(32, 2, 5, dilation=2, rel_pos_bias=True).eval()
    tokens = image_tokens(synthetic_image(64, 80), 8, 32)
    assert tokens.shape == (1, 8, 10, 32)
    maps = attention_map(module, tokens, (0, 9))
    assert maps.shape == (2, 8, 10)
    torch.testing.assert_close(maps.sum((1, 2)), torch.ones(2))
    lay = neighborhood_layers((8, 10), (0, 9), kernel_size=5, dilation=2)
    assert torch.equal(maps[0] > 0, lay.attended) and torch.equal(maps[1] > 0, lay.attended)


def _is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_show_neighborhood_command(tmp_path, capsys) -> None:
    out = tmp_path / "nb.png"
    assert main(["show", "neighborhood", "--shape", "10", "12", "--kernel-size", "4,5", "--stride", "2,1",
                 "--dilation", "1,2", "--causal", "0,1", "--query", "0,0", "--query", "5,6", "--out", str(out)]) == 0
    assert _is_png(out) and mpimg.imread(out).shape[0] > 100
    assert f"wrote {out}" in capsys.readouterr().out
    one_d = tmp_path / "nb1d.png"
    assert main(["show", "neighborhood", "--shape", "20", "--kernel-size", "5", "--out", str(one_d)]) == 0
    assert _is_png(one_d)


def test_show_attention_command(tmp_path) -> None:
    image = tmp_path / "picture.png"
    mpimg.imsave(image, synthetic_image(48, 64).numpy())
    weights = tmp_path / "na.pt"
    torch.manual_seed(3)
    torch.save(NeighborhoodAttention2D(32, 2, 5, rel_pos_bias=True).state_dict(), weights)
    out = tmp_path / "attn.png"
    assert main(["show", "attention", "--image", str(image), "--kernel-size", "5", "--dim", "32", "--heads", "2",
                 "--rpb", "--weights", str(weights), "--patch", "8", "--query", "2,3", "--out", str(out)]) == 0
    assert _is_png(out)
    synthetic = tmp_path / "synthetic.png"
    assert main(["show", "attention", "--heads", "2", "--dim", "16", "--out", str(synthetic)]) == 0
    assert _is_png(synthetic)


def test_show_argument_errors(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit):
        main(["show", "neighborhood", "--kernel-size", "five"])
    assert "comma-separated ints" in capsys.readouterr().err
    assert main(["show", "neighborhood", "--kernel-size", "3", "--stride", "4", "--out", str(tmp_path / "x.png")]) == 2
    assert "stride=(4, 4) exceeds kernel_size=(3, 3)" in capsys.readouterr().err
    assert main(["show", "attention", "--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["show", "neighborhood", "--shape", "4", "4", "4", "--out", str(tmp_path / "y.png")]) == 2
    assert "only 1-D and 2-D grids" in capsys.readouterr().err
