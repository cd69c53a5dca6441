"""The README's complete `userproxy run` flag table, generated from the click definitions (a
test keeps the README equal to it, so the table cannot drift from the code):

    python -m userproxy.flagtable          # prints the table
"""

from __future__ import annotations

import click

BEGIN, END = "<!-- run-flags:begin -->", "<!-- run-flags:end -->"


def table() -> str:
    from userproxy.cli import run

    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for param in run.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        rows.append(f"| {_names(param)} | {_default(param)} | {_help(param)} |")
    return "\n".join(rows) + "\n"


def _names(option: click.Option) -> str:
    names = [*option.opts, *option.secondary_opts]
    return ", ".join(f"`{n}`" for n in names)


def _default(option: click.Option) -> str:
    value = option.default
    if option.is_flag and not option.secondary_opts:
        return "off" if not value else "on"
    if option.secondary_opts:
        return f"`{option.opts[0] if value else option.secondary_opts[0]}`"
    if value in (None, "", ()) or type(value).__name__ == "Sentinel":  # click's "unset"
        return ""
    return f"`{value}`"


def _help(option: click.Option) -> str:
    text = " ".join((option.help or "").split()).replace("|", "\\|")
    if isinstance(option.type, click.Choice):
        text += f" ({', '.join(str(c) for c in option.type.choices)})"
    return text


def in_readme(text: str) -> str:
    """The table between the README's markers."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n") + "\n"


if __name__ == "__main__":
    print(table(), end="")
