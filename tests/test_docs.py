"""The docs stay honest: every command, setting, feature, rule and module is documented."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

from click.testing import CliRunner

from appliance import cli
from appliance.scoring.features import FEATURES
from appliance.scoring.rules import RULES
from appliance.settings import describe
from appliance.transaction import Transaction

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_every_command_is_in_the_cli_doc_and_has_an_example() -> None:
    text = (DOCS / "cli.md").read_text()
    for name, command in cli.cli.commands.items():
        if command.hidden:
            continue
        assert f"`branchguard {name}" in text, name
        help_text = CliRunner().invoke(cli.cli, [name, "--help"]).output
        if name not in ("status", "settings"):
            assert "Example:" in help_text, name


def test_every_library_function_in_the_cli_doc_exists() -> None:
    rows = [line for line in (DOCS / "cli.md").read_text().splitlines()
            if line.startswith("| `branchguard")]
    named = [ref for row in rows for ref in re.findall(r"`([\w.]+)`", row.rsplit(" | ", 1)[1])]
    assert len(named) >= len(rows)
    for ref in named:
        parts = ref.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module
            try:
                target: object = importlib.import_module("appliance." + ".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attribute in parts[cut:]:
                target = getattr(target, attribute)
            assert callable(target), ref
            break
        else:
            raise AssertionError(f"docs/cli.md names {ref}, which is not in appliance")


def test_settings_doc_is_the_generated_table() -> None:
    generated = CliRunner().invoke(cli.cli, ["settings-doc"]).output.strip()
    assert generated in (DOCS / "settings.md").read_text(), \
        "docs/settings.md is stale: regenerate it with `branchguard settings-doc`"
    assert len(generated.splitlines()) == len(describe()) + 2


def test_every_feature_and_rule_is_in_the_scoring_doc() -> None:
    text = (DOCS / "scoring.md").read_text()
    for name in FEATURES:
        assert f"`{name}`" in text, name
    for rule in RULES:
        assert f"`{rule.__name__}`" in text, rule.__name__


def test_every_contract_field_is_in_the_transactions_doc() -> None:
    text = (DOCS / "transactions.md").read_text()
    for name in Transaction.__struct_fields__:
        assert f"`{name}`" in text, name


def modules() -> set[str]:
    """Every module of the package and the console, as a path from the project root (a
    package's ``__init__.py`` only where it holds more than its docstring)."""
    found = set()
    for path in [*(ROOT / "appliance").rglob("*.py"), *(ROOT / "ui").glob("*.py")]:
        if path.name == "__main__.py":
            continue
        if path.name == "__init__.py" and not ast.parse(path.read_text()).body[1:]:
            continue
        found.add(path.relative_to(ROOT).as_posix())
    return found


def test_architecture_names_every_module_and_no_other() -> None:
    text = (DOCS / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:appliance|ui)/[\w/]+\.py)`", text))
    assert modules() - named == set(), "modules missing from docs/ARCHITECTURE.md"
    assert named - modules() == set(), "docs/ARCHITECTURE.md names modules that do not exist"


def test_every_module_path_in_the_docs_exists() -> None:
    for doc in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for path in re.findall(r"((?:appliance|ui)/[\w/]+\.py)", doc.read_text()):
            assert (ROOT / path).is_file(), f"{doc.name} names {path}"


def test_readme_quick_start_is_the_two_make_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "make run" in text and "make test" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "branchguard run --demo" in makefile


ACTIVATE = ". .venv/bin/activate"
"""The one way the docs give to reach the ``branchguard`` command in a checkout."""


def shell_blocks(text: str) -> list[list[str]]:
    """The lines of each ```sh block of a Markdown text, in order."""
    return [block.strip().splitlines() for block in re.findall(r"```sh\n(.*?)```", text, re.S)]


def test_the_readme_says_how_to_reach_the_command_before_using_it() -> None:
    """`make run` puts ``branchguard`` in .venv/bin, which is not on a user's PATH: the
    README's first command after it must come after the activation it needs, in the same
    block (tests/test_quickstart.py runs that block in a fresh clone)."""
    blocks = shell_blocks((ROOT / "README.md").read_text())
    using = [b for b in blocks if any(line.startswith("branchguard ") for line in b)]
    assert using, "the README shows no branchguard command"
    first = using[0]
    assert first[0].split("#")[0].strip() == ACTIVATE, first
    assert any(line.startswith("branchguard status") for line in first), first


def test_every_doc_says_the_same_way() -> None:
    cli_doc = (DOCS / "cli.md").read_text()
    assert f"`{ACTIVATE}`" in cli_doc
    for doc in [ROOT / "README.md", *DOCS.glob("*.md")]:
        text = doc.read_text()
        for other in ("source .venv/bin/activate", ".venv/bin/branchguard",
                      "$(VENV)/bin/branchguard"):
            assert other not in text, f"{doc.name} says {other!r}; the docs say {ACTIVATE!r}"
