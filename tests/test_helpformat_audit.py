"""The readable help of jsonargparse's parsers: plain text, and short lists of subclasses."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest
from jsonargparse import ArgumentParser
from torch import nn

from segpipe.helpformat import HelpFormatter


def _classes(module: ModuleType, base: type | None, names: list[str]) -> list[type]:
    """Classes of ``module`` (importable by class path), subclasses of ``base``."""
    made = [type(name, (base,) if base else (), {"__module__": module.__name__, "__doc__": name})
            for name in names]
    for cls in made:
        setattr(module, cls.__name__, cls)
    return made


def _base_with_subclasses(prefix: str, n: int) -> type:
    """A fresh base class of this module with ``n`` subclasses."""
    here = sys.modules[__name__]
    (base,) = _classes(here, None, [f"{prefix}Base"])
    _classes(here, base, [f"{prefix}Sub{i}" for i in range(n)])
    return base


def _help(**options: type) -> str:
    parser = ArgumentParser(prog="tool", formatter_class=HelpFormatter)
    for name, cls in options.items():
        parser.add_argument(f"--{name}", type=cls, help=f"the {name}")
    return " ".join(parser.format_help().split())


def test_a_short_list_of_subclasses_is_left_whole() -> None:
    """Up to eight known classes are listed as jsonargparse lists them; a ninth shortens the
    list to eight, with the pointer to ``--X.help CLASS`` and the closing parenthesis kept."""
    eight = _help(thing=_base_with_subclasses("Eight", 7))
    assert "known subclasses: " in eight and "EightSub6" in eight
    assert "any importable" not in eight
    nine = _help(thing=_base_with_subclasses("Nine", 8))
    assert "known subclasses" not in nine and "NineSub7" not in nine and "NineSub6" in nine
    assert "any importable subclass works (its options: --thing.help CLASS))" in nine


def test_segpipes_own_classes_come_first_and_the_list_stays_short(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A base with segpipe subclasses among many others lists segpipe's first, eight names in
    all."""
    base = _base_with_subclasses("Many", 10)
    ours = ModuleType("segpipe.auditfake")
    monkeypatch.setitem(sys.modules, ours.__name__, ours)
    _classes(ours, base, ["Ours0", "Ours1", "Ours2"])
    text = _help(thing=base)
    listed = text.split("e.g. ", 1)[1].split(";", 1)[0].split(", ")
    assert listed[:3] == ["segpipe.auditfake.Ours0", "segpipe.auditfake.Ours1",
                          "segpipe.auditfake.Ours2"]
    assert len(listed) == 8


def test_a_network_option_names_segpipes_models() -> None:
    """An ``nn.Module`` option (every network of torch known) names segpipe's three models and
    ``torch.nn.Module``, not torch's layers."""
    text = _help(net=nn.Module)
    listed = text.split("e.g. ", 1)[1].split(";", 1)[0]
    assert listed == ("segpipe.models.UNet, segpipe.models.FCN, segpipe.models.SmpModel, "
                      "torch.nn.Module")


@pytest.mark.parametrize("where", ["description", "group"])
def test_rst_double_backquotes_are_dropped(where: str) -> None:
    """Docstring markup (````code````) does not reach the help: neither in the description nor
    in a group's title."""
    parser = ArgumentParser(prog="tool", formatter_class=HelpFormatter,
                            description="Reads ``data.root``." if where == "description" else None)
    group = parser.add_argument_group("The ``model`` options" if where == "group" else "Other")
    group.add_argument("--x", type=int, default=1, help="an ``x``")
    text = parser.format_help()
    assert "``" not in text
    assert ("Reads data.root." if where == "description" else "The model options") in text
