"""A readable help for jsonargparse's parsers (``segpipe fit|validate|test``, ``check-data``)."""

from __future__ import annotations

from typing import Any

from jsonargparse import DefaultHelpFormatter

__all__ = ["HelpFormatter"]


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, readable: plain text and short lists of classes.

    Docstrings' RST markup (double backquotes) is dropped, and a class option whose base class
    has many known subclasses (``--model.net`` would list every ``nn.Module`` of torch, timm and
    smp) names segpipe's own classes and a few others, with a pointer to ``--X.help CLASS``.
    """

    _MAX_LISTED = 8

    def _format_text(self, text: str) -> str:
        return super()._format_text(text.replace("``", ""))

    def start_section(self, heading: str | None) -> None:
        super().start_section(heading.replace("``", "") if heading else heading)

    def _get_help_string(self, action: Any) -> str:
        text = super()._get_help_string(action).replace("``", "")
        marker = ", known subclasses: "
        if marker not in text:
            return text
        head, rest = text.split(marker, 1)
        paths, tail = rest, ""
        if rest.endswith(")"):
            paths, tail = rest[:-1], ")"
        names = [p.strip() for p in paths.split(",") if p.strip()]
        if len(names) <= self._MAX_LISTED:
            return text
        if "torch.nn.Module" in names:  # a network: segpipe's models, importable or not yet
            ours = ["segpipe.models.UNet", "segpipe.models.FCN", "segpipe.models.SmpModel"]
            others = ["torch.nn.Module"]
        else:
            ours = [n for n in names if n.startswith("segpipe.")]
            others = [n for n in names if not n.startswith("segpipe.")]
        shown = ours + others[: max(0, self._MAX_LISTED - len(ours))]
        option = action.option_strings[0] if action.option_strings else "--X"
        return (f"{head}, e.g. {', '.join(shown)}; any importable subclass works (its "
                f"options: {option}.help CLASS){tail}")
