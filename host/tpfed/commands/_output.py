"""How the commands print: rich on a terminal, and when standard output is a pipe or a file,
plain text that is never cut or wrapped to 80 columns (no colours, no cropping), so
``tpfed plan | grep`` and ``tpfed devices > devices.txt`` hold every name whole."""

from __future__ import annotations

import sys

PIPE_WIDTH = 1000  # wide enough for any table a command prints: rich never crops it


def console():
    """A rich console for standard output: full-featured on a terminal; on a pipe or file,
    uncoloured and :data:`PIPE_WIDTH` wide (tables take only the width they need)."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=PIPE_WIDTH, soft_wrap=True, no_color=True, highlight=False,
                   emoji=False)


def print_table(table, con=None) -> None:
    """Print a rich table. On a pipe, its caption (notes under the table) is printed as plain
    lines after it rather than wrapped to the table's width."""
    con = con or console()
    caption = getattr(table, "caption", None)
    if caption and not sys.stdout.isatty():
        table.caption = None
        con.print(table)
        for line in str(caption).splitlines():
            con.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    con.print(table)


def text_argument(arg: str, what: str = "the prompt", *, all_newlines: bool = False) -> str:
    """A text argument, or standard input for ``-``, as UTF-8 text: bytes that are not UTF-8
    (on the command line, where Python keeps them as surrogates, or on standard input) raise a
    :class:`~tpfed.errors.TpfedError` (one line) rather than a traceback later on. One trailing newline of
    standard input is dropped (every one with ``all_newlines``)."""
    from tpfed.errors import TpfedError

    if arg == "-":
        raw = sys.stdin.buffer.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TpfedError(f"{what} on standard input is not valid UTF-8 (byte "
                             f"0x{raw[exc.start]:02x} at offset {exc.start})") from None
        if all_newlines:
            return text.rstrip("\n")
        return text[:-1] if text.endswith("\n") else text
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = arg[exc.start].encode("utf-8", "surrogateescape")
        raise TpfedError(f"{what} is not valid UTF-8 (byte 0x{bad[0]:02x} at character "
                         f"{exc.start})") from None
    return arg
