"""``visattn bench``: the report says the right things (correctness, refusals, fields), on tiny problems.

No assertion here is about time: only about what the table/JSON/plot contain.
"""

from __future__ import annotations

import json
from typing import Optional

import pytest
import torch

from visattn.bench import BenchProblem, Built, Peer, run_bench, run_zoo
from visattn.bench.peers import DenseSDPA, FlexAttention, PlainGather, VisattnBackend, na_block_mask, na_mask_mod
from visattn.bench.report import format_table, format_zoo_table, to_json, zoo_to_json
from visattn.bench.zoo import MIXER_HEADS, zoo_setup
from visattn.cli.main import main
from visattn.functional import neighborhood_attention
from visattn.nn import attn_info
from visattn.spec import make_spec, na_flops, neighbor_table

TINY = dict(shape=(6, 7), heads=2, head_dim=4, kernel_size=3)
FAST = dict(budget_s=0.01, peak_gflops=100.0, measure_memory=False)


class WrongPeer(Peer):
    """Forgets the softmax scale: plausible-looking output, wrong numbers."""

    name = "wrong scale"

    def build(self, problem: BenchProblem) -> Built:
        kw = problem.na_kwargs()
        return Built(lambda q, k, v: neighborhood_attention(q, k, v, **kw, scale=1.0, backend="torch"))


class DetachedKeyPeer(Peer):
    """Right forward, but no gradient reaches the keys: only a gradient check can catch it."""

    name = "detached keys"

    def build(self, problem: BenchProblem) -> Built:
        kw = problem.na_kwargs()
        return Built(lambda q, k, v: neighborhood_attention(q, k.detach(), v, **kw, backend="torch"))


class RefusingPeer(Peer):
    name = "refuser"

    def refuse(self, problem: BenchProblem, max_bytes: float) -> Optional[str]:
        return "does not do odd widths"

    def build(self, problem: BenchProblem) -> Built:  # never called: refuse() said no
        raise AssertionError("build() called after refuse()")


class MissingPeer(Peer):
    name = "missing"

    def unavailable(self) -> Optional[str]:
        return "libfoo is not installed"

    def build(self, problem: BenchProblem) -> Built:
        raise AssertionError("build() called on an unavailable peer")


class RaisingPeer(Peer):
    """Refuses only when called, the way a library signals an unsupported case."""

    name = "raises"

    def build(self, problem: BenchProblem) -> Built:
        def fn(q, k, v):
            raise NotImplementedError("no kernel for this shape\nsecond line")

        return Built(fn)


def _rows(result):
    return {r.name: r for r in result.rows}


def test_forward_report_flags_wrong_and_shows_refusals():
    problem = BenchProblem(**TINY)
    peers = [VisattnBackend("torch"), PlainGather(), WrongPeer(), DenseSDPA(), RefusingPeer(), MissingPeer(),
             RaisingPeer()]
    result = run_bench(problem, peers, **dict(FAST, measure_memory=True))
    rows = _rows(result)
    assert [r.name for r in result.rows] == [p.name for p in peers]
    assert rows["visattn torch"].correct is True and rows["plain gather"].correct is True
    assert rows["visattn torch"].max_err < 1e-5
    assert rows["wrong scale"].correct is False and rows["wrong scale"].max_err > 1e-3
    assert rows["dense SDPA (global, not NA)"].checked is False and rows["dense SDPA (global, not NA)"].correct is None
    assert (rows["refuser"].status, rows["refuser"].reason) == ("refused", "does not do odd widths")
    assert (rows["missing"].status, rows["missing"].reason) == ("unavailable", "libfoo is not installed")
    assert rows["raises"].status == "refused"
    assert rows["raises"].reason == "NotImplementedError: no kernel for this shape"  # first line only
    for name in ("visattn torch", "plain gather", "wrong scale", "dense SDPA (global, not NA)"):
        r = rows[name]
        assert r.median_ms > 0 and r.gflops > 0 and r.peak_extra_mb is not None and r.peak_extra_mb >= 0
        assert r.pct_peak == pytest.approx(100 * r.gflops / 100.0)
        assert r.gflops == pytest.approx(problem.flops / (r.median_ms / 1e3) / 1e9)
    # The best visattn row is chosen among correct ones, and every timed row is compared with it.
    assert result.best_visattn() is rows["visattn torch"]
    assert rows["visattn torch"].speedup_vs["plain gather"] == pytest.approx(
        rows["plain gather"].median_ms / rows["visattn torch"].median_ms)

    table = format_table(result)
    lines = {line.split("  ")[0]: line for line in table.splitlines()}
    assert "NO (" in lines["wrong scale"] and "yes (" in lines["visattn torch"]
    assert "n/a (not NA)" in lines["dense SDPA (global, not NA)"]
    assert "refused: does not do odd widths" in lines["refuser"]
    assert "unavailable: libfoo is not installed" in lines["missing"]
    assert "2-D NA, B=1, 6x7, 2 heads, head dim 4, kernel 3" in table
    assert "matmul peak: 100.0 GFLOP/s" in table


def test_backward_checks_gradients_and_shows_flex_refusal_on_cpu():
    problem = BenchProblem(**TINY, backward=True)
    result = run_bench(problem, [VisattnBackend("torch"), DetachedKeyPeer(), FlexAttention(compiled=False)], **FAST)
    rows = _rows(result)
    assert rows["visattn torch"].correct is True
    assert rows["detached keys"].correct is False  # forward identical, dk missing
    assert rows["flex eager"].status == "refused" and "backward" in rows["flex eager"].reason
    assert problem.flops == 3 * BenchProblem(**TINY).flops


def test_json_has_every_row_and_field():
    result = run_bench(BenchProblem(**TINY), [VisattnBackend("torch"), RefusingPeer()], **FAST)
    doc = json.loads(to_json(result))
    assert doc["problem"]["shape"] == [6, 7] and doc["problem"]["kernel_size"] == [3, 3]
    assert doc["matmul_peak_gflops"] == 100.0 and doc["best_visattn"] == "visattn torch"
    ok, refused = doc["rows"]
    for key in ("correct", "max_err", "median_ms", "times_ms", "gflops", "pct_peak", "peak_extra_mb", "speedup_vs"):
        assert key in ok
    assert ok["correct"] is True and len(ok["times_ms"]) >= 1
    assert refused["status"] == "refused" and refused["median_ms"] is None


@pytest.mark.parametrize("kw", [
    dict(shape=(20, 23), kernel_size=(5, 3), dilation=(2, 3)),
    dict(shape=(20, 23), kernel_size=(4, 5), stride=(2, 5), is_causal=(True, False)),
    dict(shape=(300,), kernel_size=9, dilation=7, is_causal=True),
    dict(shape=(5, 6, 7), kernel_size=3, stride=(1, 2, 3), dilation=(1, 2, 1)),
])
def test_flex_mask_and_block_mask_encode_the_neighbourhood(kw):
    problem = BenchProblem(heads=1, head_dim=4, **kw)
    index, valid, _ = neighbor_table(problem.spec)
    n = problem.spec.num_tokens
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[torch.arange(n)[:, None].expand_as(index)[valid], index[valid]] = True
    got = na_mask_mod(problem)(0, 0, torch.arange(n)[:, None], torch.arange(n)[None, :])
    assert torch.equal(got, allowed)

    block = 32
    bm = na_block_mask(problem, block=block)
    nb = -(-n // block)
    padded = torch.zeros(nb * block, nb * block, dtype=torch.bool)
    padded[:n, :n] = allowed
    inside = torch.zeros_like(padded)
    inside[:n, :n] = True
    tiles = padded.reshape(nb, block, nb, block).transpose(1, 2)
    real = inside.reshape(nb, block, nb, block).transpose(1, 2)
    any_ = tiles.any(-1).any(-1)
    full = (tiles == real).all(-1).all(-1) & any_

    def listed(num, idx):
        out = torch.zeros(nb, nb, dtype=torch.bool)
        for qb in range(nb):
            out[qb, idx[0, 0, qb, : num[0, 0, qb]].long()] = True
        return out

    assert torch.equal(listed(bm.full_kv_num_blocks, bm.full_kv_indices), full)
    assert torch.equal(listed(bm.kv_num_blocks, bm.kv_indices), any_ & ~full)


def test_flex_eager_matches_oracle_through_the_runner():
    problem = BenchProblem(shape=(9, 11), heads=2, head_dim=8, kernel_size=(3, 5), dilation=(2, 1), stride=(1, 2))
    row = run_bench(problem, [FlexAttention(compiled=False)], **FAST).rows[0]
    assert row.status == "ok" and row.correct is True


def _cli(capsys, *argv):
    code = main(["bench", "--shape", "6", "7", "--kernel", "3", "--heads", "2", "--head-dim", "4",
                 "--budget", "0.01", *argv])
    assert code == 0
    return capsys.readouterr()


def test_cli_json_to_stdout_parses(capsys):
    out = _cli(capsys, "--only", "torch", "gather", "--json", "--no-memory")
    doc = json.loads(out.out)
    assert [r["name"] for r in doc["rows"]] == ["visattn torch", "plain gather"]
    assert all(r["correct"] for r in doc["rows"])
    assert "[1/2] visattn torch" in out.err  # progress goes to stderr


def test_cli_plot_writes_png(capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (pip install 'visattn[plot]')")
    path = tmp_path / "bench.png"
    out = _cli(capsys, "--only", "torch", "--plot", str(path), "--no-memory")
    assert "visattn torch" in out.out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_inconsistent_flags(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--rank", "3", "--shape", "5", "5"])
    assert "--rank 3 but --shape 5 5 has 2 axes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--shape", "8", "8", "--kernel", "3", "3", "3"])
    assert "--kernel got 3 values" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--shape", "8", "8", "--kernel", "3", "--stride", "4"])
    assert "stride" in capsys.readouterr().err


def test_zoo_setup_defaults_and_overrides():
    kwargs, shape = zoo_setup("na2d", attn_info("na2d"))
    assert kwargs == dict(num_heads=MIXER_HEADS, kernel_size=7) and shape == (1, 56, 56, 96)
    assert zoo_setup("na1d", attn_info("na1d"))[1] == (1, 3136, 96)
    assert zoo_setup("na3d", attn_info("na3d"))[1] == (1, 4, 28, 28, 96)
    info = dict(attn_info("na2d"), bench_kwargs=dict(kernel_size=5, dilation=2), bench_input=(1, 14, 14, 96))
    kwargs, shape = zoo_setup("na2d", info)
    assert kwargs == dict(num_heads=MIXER_HEADS, kernel_size=5, dilation=2) and shape == (1, 14, 14, 96)


def test_zoo_measures_modules_and_reports_failures():
    def create(name, channels, **kw):
        if name == "na3d":
            raise RuntimeError("cannot build")
        from visattn.nn import create_attn
        return create_attn(name, channels, **kw)

    rows = run_zoo(["na2d", "na3d"], budget_s=0.01, create=create)
    ok, bad = rows
    expected = sum(p.numel() for p in create("na2d", 96, num_heads=3, kernel_size=7).parameters())
    assert ok.status == "ok" and ok.params == expected
    # qkv and proj linears plus the useful NA work, whichever backend runs the timings.
    linears = 2 * 3136 * 96 * (3 * 96 + 96)
    attention = na_flops(make_spec("test", (56, 56), 7), batch=1, heads=3, dim=32)
    assert round(ok.fwd_gflop * 1e9) == linears + attention
    assert ok.fwd_ms > 0 and ok.fwd_bwd_ms > 0 and ok.peak_fwd_bwd_mb > 0
    assert (bad.status, bad.reason) == ("failed", "RuntimeError: cannot build")
    table = format_zoo_table(rows, dict(cpu="cpu", threads=1, torch="x"))
    assert "failed: RuntimeError: cannot build" in table
    assert json.loads(zoo_to_json(rows, {}))["rows"][0]["name"] == "na2d"


def test_default_peers_follow_the_backend_registry(monkeypatch):
    import visattn.backends as backends
    from visattn.backends.torch_tiled import TorchTiledBackend
    from visattn.bench import default_peers

    class Extra(TorchTiledBackend):
        name = "extra"

    monkeypatch.setitem(backends._INSTANCES, "extra", Extra())
    names = [p.name for p in default_peers()]
    assert names[: len(backends.list_backends())] == [f"visattn {n}" for n in backends.list_backends()]
    assert "visattn extra" in names
    assert {"NATTEN", "flex eager", "flex compiled", "dense SDPA (global, not NA)", "plain gather"} <= set(names)
    # The oracle is listed, not timed, unless asked for.
    ref = {p.name: p for p in default_peers()}["visattn reference"]
    assert ref.skip and "oracle" in ref.skip
    assert {p.name: p for p in default_peers(time_reference=True)}["visattn reference"].skip is None
    row = run_bench(BenchProblem(**TINY), [ref, VisattnBackend("extra")], **FAST).rows
    assert row[0].status == "skipped" and row[1].correct is True


def test_problem_line_says_when_the_window_was_fitted_to_a_small_input():
    line = BenchProblem(shape=(20, 20), kernel_size=7, dilation=4).describe()
    assert "dilation 2 (asked 4, fitted to the input)" in line and "kernel 7," in line


def test_half_precision_is_checked_with_its_own_tolerance():
    problem = BenchProblem(**TINY, dtype=torch.bfloat16)
    rows = _rows(run_bench(problem, [VisattnBackend("torch"), WrongPeer()], **FAST))
    assert rows["visattn torch"].correct is True and 0 < rows["visattn torch"].max_err < 2e-2
    assert rows["wrong scale"].correct is False


def test_zoo_times_backward_of_parameter_free_and_batchnorm_modules():
    """A plug-in without parameters still has a backward (through its input); a BatchNorm after
    global pooling must not fail at batch 1."""
    def create(name, channels, **kw):
        if name == "na1d":
            return torch.nn.Softmax(dim=-1)
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.BatchNorm2d(56))  # [1, 56, 56, 96] in

    rows = run_zoo(["na1d", "na2d"], budget_s=0.01, create=create, measure_memory=False)
    assert [(r.status, r.reason) for r in rows] == [("ok", ""), ("ok", "")]
    assert rows[0].params == 0 and rows[0].fwd_bwd_ms > 0 and rows[1].fwd_bwd_ms > 0


def test_implementations_are_timed_in_alternating_rounds(monkeypatch):
    """On a machine whose load changes over seconds, each implementation's median must cover the
    same periods as its peers': calls alternate between them in rounds, each still gets its own
    budget's worth of calls, and one that raises while timed is reported without stopping the rest.
    The clock is simulated (each call advances it by its nominal cost), so machine load cannot
    change the call counts checked here."""
    from visattn.bench import measure
    from visattn.bench.measure import Timing, time_interleaved

    class Clock:
        now = 0.0

        def perf_counter(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(measure, "time", clock)
    log: list[str] = []

    def fast():
        log.append("fast")
        clock.now += 1e-4

    def slow():
        log.append("slow")
        clock.now += 4e-3

    def flaky():
        log.append("flaky")
        clock.now += 1e-4
        if log.count("flaky") > 3:
            raise RuntimeError("broke while timed")

    timings = time_interleaved([fast, slow, flaky], "cpu", budget_s=0.1, max_reps=40, rounds=5)
    assert isinstance(timings[0], Timing) and isinstance(timings[1], Timing)
    assert isinstance(timings[2], RuntimeError) and "broke while timed" in str(timings[2])
    assert len(timings[0].times) == 40 and 10 <= len(timings[1].times) <= 30  # each its own budget
    timed = log[log.index("slow", log.index("flaky")):]  # after every warm-up
    switches = sum(a != b for a, b in zip(timed, timed[1:]))
    assert switches >= 8, f"calls were not interleaved: {timed}"


class _LeanCopy(torch.autograd.Function):
    """out = q + k + v with a backward that allocates only the three gradients it returns."""

    @staticmethod
    def forward(ctx, q, k, v):
        return q + k + v

    @staticmethod
    def backward(ctx, g):
        return g.clone(), g.clone(), g.clone()


class LeanPeer(Peer):
    """Allocates exactly its output and gradients, like a fused kernel with no temporaries."""

    name = "lean"
    checked = False

    def build(self, problem: BenchProblem) -> Built:
        return Built(_LeanCopy.apply)


def test_backward_memory_counts_the_gradients_each_call_returns():
    """Peak extra memory of a forward+backward call includes the output and the three gradients it
    returns: no gradient from an earlier call is freed inside the measured call and netted
    against them (with gradients accumulated into .grad, a fused kernel showed ~1/4 of its memory)."""
    problem = BenchProblem(shape=(32, 32), heads=2, head_dim=16, kernel_size=3, backward=True)
    rows = _rows(run_bench(problem, [VisattnBackend("torch"), LeanPeer()], **dict(FAST, measure_memory=True)))
    returned_mb = 4 * 32 * 32 * 2 * 16 * 4 / 2**20  # out, dq, dk, dv in float32
    for name in ("visattn torch", "lean"):
        assert rows[name].peak_extra_mb is not None and rows[name].peak_extra_mb >= returned_mb, name
