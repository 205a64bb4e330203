"""Terminal output of the CLI (``visattn bench``, ``visattn train``): progress bars and text tables.

Both come from `rich <https://github.com/Textualize/rich>`_ when it is installed (the ``bench``,
``train`` and ``test`` extras install it) and fall back to plain text when it is not; rich is
imported only when one of these is used, never by ``import visattn``.

* :class:`ProgressBar`: steps done out of a total, on stderr, with message lines printed above the
  bar. The bar is drawn only on a terminal; in a pipe, a log file or a captured stream only the
  message lines appear, one per line, so logs stay readable and parseable.
* :func:`render_table`: rows of cell strings as an aligned text table (a string: the caller decides
  where it goes, and the same text lands in a terminal, a file or a test).
"""

from __future__ import annotations

import io
import sys
from types import ModuleType
from typing import Callable, Collection, Optional, Sequence

__all__ = ["ProgressBar", "render_table"]

#: the widest a free-text last column gets before its cells wrap onto continuation lines
LAST_COLUMN_WIDTH = 64


def _rich() -> Optional[ModuleType]:
    """The ``rich`` package, or ``None`` when it cannot be imported (then plain text is used)."""
    try:
        import rich.box
        import rich.console
        import rich.progress
        import rich.table
        import rich.text
    except ImportError:
        return None
    return rich


class ProgressBar:
    """Progress of a run of ``total`` steps on stderr, as a context manager.

    ``bar(message)`` prints a line (above the bar while it is drawn); ``bar.describe(text)`` says
    what is running now; ``bar.advance(...)`` marks steps done and may update the ``fields`` shown
    after the counts (a format string, e.g. ``"loss {loss:.3f}"``, filled from its keywords).

    The bar is drawn by rich when it is installed, ``enabled`` is set, no ``log`` callback is
    given and stderr is a terminal. Otherwise nothing is drawn and each message is one plain line
    on stderr, or a call of ``log`` when given (so a caller can collect the lines); ``enabled=False``
    silences the messages too. ``transient`` removes the finished bar from the screen.
    """

    def __init__(self, total: int, description: str = "", *, enabled: bool = True,
                 log: Optional[Callable[[str], None]] = None, fields: str = "", transient: bool = False) -> None:
        self.total, self.description, self.enabled, self.log = total, description, enabled, log
        self.fields, self.transient = fields, transient
        self._progress = None  # rich.progress.Progress while a bar is drawn
        self._task = None

    def __enter__(self) -> "ProgressBar":
        rich = _rich() if self.enabled and self.log is None else None
        if rich is not None:
            console = rich.console.Console(stderr=True)
            if console.is_terminal:
                rp = rich.progress
                self._progress = rp.Progress(
                    rp.TextColumn("{task.description}", markup=False), rp.BarColumn(), rp.MofNCompleteColumn(),
                    rp.TextColumn("{task.fields[postfix]}", markup=False), rp.TimeElapsedColumn(),
                    rp.TextColumn("<"), rp.TimeRemainingColumn(), console=console, transient=self.transient)
                self._progress.start()
                self._task = self._progress.add_task(self.description, total=self.total, postfix="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __call__(self, message: str) -> None:
        if self.log is not None:
            self.log(message)
        elif self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
        elif self.enabled:
            print(message, file=sys.stderr, flush=True)

    def describe(self, description: str) -> None:
        """Show ``description`` (what is running now) before the bar."""
        if self._progress is not None:
            self._progress.update(self._task, description=description)

    def advance(self, steps: int = 1, **fields) -> None:
        """Mark ``steps`` more steps done; ``fields`` are new values for the ``fields`` format."""
        if self._progress is None:
            return
        postfix = {"postfix": self.fields.format(**fields)} if fields else {}
        self._progress.update(self._task, advance=steps, **postfix)


def render_table(columns: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> str:
    """An aligned text table: a header, a rule, one line per row; trailing spaces stripped.

    Columns whose index is in ``right`` are right-aligned (numbers). The last column is free text
    (notes): with rich it wraps past :data:`LAST_COLUMN_WIDTH` characters onto continuation lines;
    the plain fallback leaves it unpadded at the end of each line. The result is the same whether
    or not a terminal is attached (no colours, no terminal-width dependence).
    """
    rich = _rich()
    if rich is None:
        return _plain_table(columns, rows, set(right))
    table = rich.table.Table(box=rich.box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="")
    last = len(columns) - 1
    for i, name in enumerate(columns):
        table.add_column(name, justify="right" if i in right else "left", no_wrap=i != last, overflow="fold",
                         max_width=LAST_COLUMN_WIDTH if i == last else None)
    for row in rows:  # as Text: a cell's square brackets ("visattn[triton]") are text, not rich markup
        table.add_row(*(rich.text.Text(cell) for cell in row))
    # Wide enough that only the last column ever wraps; rendered without a terminal or colours.
    width = sum(max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns))
    out = io.StringIO()
    rich.console.Console(file=out, width=width + 3 * len(columns), color_system=None, force_terminal=False,
                         highlight=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def _plain_table(columns: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """The fallback without rich: two spaces between columns, dashes under the header."""
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    widths[-1] = len(columns[-1])  # free text: do not pad every line to the longest note

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i in right else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows])
