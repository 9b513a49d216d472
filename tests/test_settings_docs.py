"""Every setting is documented: a row in docs/settings.md and a flag in `serve --help`."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from peoplebase.cli import main
from peoplebase.settings import SETTINGS, Setting
from tests.conftest import ROOT

DOC = ROOT / "docs" / "settings.md"


def doc_rows() -> dict[str, list[str]]:
    """Setting name → the cells of its row in the table of docs/settings.md."""
    rows: dict[str, list[str]] = {}
    for line in DOC.read_text().splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] != "Setting":
            rows[cells[0]] = cells
    return rows


def serve_help() -> str:
    r = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200)
    assert r.exit_code == 0
    return r.stdout


def documented_default(setting: Setting) -> str:
    return "empty" if setting.default == "" else f"`{setting.default}`"


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_setting_has_a_row_in_docs(setting: Setting) -> None:
    rows = doc_rows()
    assert setting.name in rows, f"{setting.name} is missing from docs/settings.md"
    name, flag, env, default, meaning = rows[setting.name]
    assert flag == f"`--{setting.name.replace('_', '-')}`"
    assert env == f"`PEOPLEBASE_{setting.name.upper()}`"
    assert default.startswith(documented_default(setting)), default
    assert len(meaning) > 20
    for choice in setting.choices or ():
        assert f"`{choice}`" in meaning, f"choice {choice!r} of {setting.name} is not explained"


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_setting_is_in_serve_help(setting: Setting) -> None:
    text = serve_help()
    flag = f"--{setting.name.replace('_', '-')}"
    assert re.search(rf"^\s+{re.escape(flag)}\b", text, re.MULTILINE), f"{flag} not in --help"
    assert f"PEOPLEBASE_{setting.name.upper()}" in text


def test_docs_name_no_setting_that_does_not_exist() -> None:
    assert set(doc_rows()) == {s.name for s in SETTINGS}


def test_docs_explain_what_synchronous_promises() -> None:
    text = DOC.read_text()
    row = " ".join(doc_rows()["synchronous"])
    assert "fsync" in row and "power loss" in row and "crash" in row
    assert "group commit" in text
