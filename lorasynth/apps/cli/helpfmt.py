"""Help formatting shared by every command: shown defaults, examples kept as written.

``build_parser`` applies :class:`HelpFormatter` to every (sub)parser; commands pass
``epilog=examples("lorasynth inspect me.safetensors", ...)``. Light on purpose: ``--help``
imports nothing but argparse.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions paragraph by paragraph, keeps ``examples:`` blocks as written, and
    appends ``(default: X)`` to option help.

    No default is shown for flags, ``None``/empty defaults, or help that already states one.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "\n".join(indent + line for line in text.splitlines())
        return "\n".join(super(HelpFormatter, self)._fill_text(part, width, indent) for part in text.split("\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None or default is False
                or default is argparse.SUPPRESS or default == "" or default == []
                or isinstance(action, (argparse._StoreConstAction, argparse._AppendConstAction))):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def examples(*lines: str) -> str:
    """An ``examples:`` epilog block."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def apply_formatter(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every sub-parser below it :class:`HelpFormatter`; a sub-command
    without a description gets its one-line help as description."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    sub.description = helps[name][0].upper() + helps[name][1:] + "."
                apply_formatter(sub)
