"""visattn.console: the CLI's progress bars and tables, with rich and in the plain-text fallback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from visattn.console import LAST_COLUMN_WIDTH, ProgressBar, render_table

COLUMNS = ("name", "ms", "notes")
ROWS = [["fast", "1.25", "ok"], ["a longer name", "120.50", "refused: " + "word " * 30]]


@pytest.fixture
def without_rich(monkeypatch):
    """Make ``import rich`` fail, as on an install without the bench/train extras."""
    for name in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rich", None)


def test_rich_table_aligns_columns_and_wraps_only_the_last():
    pytest.importorskip("rich")
    lines = render_table(COLUMNS, ROWS, right={1}).splitlines()
    assert lines[0].split() == ["name", "ms", "notes"] and set(lines[1]) == {"─"}
    by_name = {line.split("  ")[0]: line for line in lines}
    assert by_name["fast"].index("1.25") + 4 == by_name["a longer name"].index("120.50") + 6  # right-aligned
    notes_at = lines[0].index("notes")
    continued = [line for line in lines[2:] if not line[:notes_at].strip()]
    assert continued and all(len(line) - notes_at <= LAST_COLUMN_WIDTH for line in lines)
    assert " ".join(line[notes_at:] for line in lines[3:]).split() == ROWS[1][2].split()


def test_rich_table_prints_square_brackets_as_text():
    """Notes name install extras (``pip install 'visattn[triton]'``): rich must not read them as markup."""
    pytest.importorskip("rich")
    table = render_table(("name", "notes"), [["triton", "install it with pip install 'visattn[triton]'"],
                                              ["x", "[bold]not bold[/bold]"]])
    assert "'visattn[triton]'" in table and "[bold]not bold[/bold]" in table


def test_plain_table_without_rich(without_rich):
    lines = render_table(COLUMNS, ROWS, right={1}).splitlines()
    assert lines[:2] == ["name               ms  notes", "-------------  ------  -----"]
    assert lines[2] == "fast             1.25  ok"
    assert lines[3].startswith("a longer name  120.50  refused: word word")  # the last column runs on


def test_progress_without_a_terminal_prints_plain_lines(capsys):
    with ProgressBar(3, "job") as bar:
        bar("first line")
        bar.describe("step 2")
        bar.advance(2)
        bar("[2/3] second line")  # brackets are text, not markup
    assert capsys.readouterr().err == "first line\n[2/3] second line\n"


def test_progress_without_rich(without_rich, capsys):
    with ProgressBar(2, "job", fields="loss {loss:.2f}") as bar:
        bar.advance(loss=0.5)
        bar("done")
    assert capsys.readouterr().err == "done\n"


def test_progress_log_callback_and_disabled(capsys):
    got = []
    with ProgressBar(1, "job", log=got.append) as bar:
        bar("to the callback")
        bar.advance()
    with ProgressBar(1, "job", enabled=False) as bar:
        bar("silenced")
    assert got == ["to the callback"] and capsys.readouterr().err == ""


def test_progress_bar_is_drawn_on_a_terminal(monkeypatch, capsys):
    rich_console = pytest.importorskip("rich.console")
    monkeypatch.setattr(rich_console.Console, "is_terminal", property(lambda self: True))
    with ProgressBar(4, "epoch 1/2", fields="loss {loss:.3f}") as bar:
        bar("a message above the bar")
        for _ in range(4):
            bar.advance(loss=0.25)
    err = capsys.readouterr().err
    assert "a message above the bar" in err
    assert "epoch 1/2" in err and "4/4" in err and "loss 0.250" in err


def test_import_visattn_does_not_import_rich():
    code = "import sys, visattn, visattn.bench, visattn.console; assert 'rich' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
