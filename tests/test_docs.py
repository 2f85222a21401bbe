"""docs/api.md documents every public name, and its "Not yet available" list names only what is missing.

The rule: the reference is docs/api.md above its "## Not yet available" heading.  A name counts as
documented only by a code span (text in single backticks) there:

- each name in ``nbbgtask.__all__`` and each exception of ``nbbgtask.core.errors``: a heading with a
  code span that starts with ``bg.NAME`` (or is ``NAME``, for an exception not exported);
- each public member of ``TaskStatus``: a code span that starts with ``status.NAME``;
- each member and public attribute of ``State``: a code span that starts with ``bg.State.NAME`` or
  ``state.NAME``;
- each ``configure`` parameter: a code span ``NAME=DEFAULT``, with its default as in the signature;
- each command-line subcommand: a heading with a code span that starts with ``nbbgtask SUBCOMMAND``
  and names one spelling of each of its options (``--home``: a heading span ``nbbgtask [--home ...``);
- each ``%bgtask`` line form and ``%%bgtask``: a heading with a code span that starts with
  ``%bgtask WORD`` (``%%bgtask``) and names each of its options.

Under "## Not yet available", the code spans in each item's bold lead name missing features:
``bg.X``, ``status.X``, ``start_method="X"``, ``nbbgtask X`` and ``%bgtask X`` must not exist.
And what the code says is not available yet (a message such as "... is not available for Dask
tasks yet", found in nbbgtask's string literals) is what that section quotes: each such message
is quoted there, in double quotes, and each message quoted there is one the code gives.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import re
from pathlib import Path

import nbbgtask as bg
from nbbgtask.commands import cli as _cli
from nbbgtask.commands import table as _table
from nbbgtask.core import config as _config
from nbbgtask.core import errors as _errors

API_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"
PACKAGE = Path(bg.__file__).resolve().parent
NOT_YET = "## Not yet available"
SPAN = re.compile(r"`([^`\n]+)`")


def _parts() -> tuple[str, str]:
    text = API_MD.read_text(encoding="utf-8")
    reference, sep, not_yet = text.partition("\n" + NOT_YET + "\n")
    assert sep, f"{API_MD} has no {NOT_YET!r} heading"
    return reference, not_yet


def _spans(text: str) -> list[str]:
    return SPAN.findall(text)


def _heading_spans(text: str) -> list[str]:
    return [s for line in text.splitlines() if line.startswith("#") for s in _spans(line)]


def _starts(span: str, prefix: str) -> bool:
    """``span`` begins with ``prefix``, and ``prefix`` ends a word there (``bg.run`` is not ``bg.runner``)."""
    if not span.startswith(prefix):
        return False
    rest = span[len(prefix) :]
    return not rest or not (rest[0].isalnum() or rest[0] == "_")


def _missing(wanted: list[str], spans: list[str], *prefixes: str) -> list[str]:
    return [w for w in wanted if not any(_starts(s, p + w) for s in spans for p in prefixes)]


def _report(kind: str, missing: list[str]) -> str:
    return f"{API_MD.name} does not document these {kind}: " + ", ".join(missing)


# -- what the code offers --------------------------------------------------------------------------


def _subcommands() -> dict[str, list[list[str]]]:
    """Each subcommand of the ``nbbgtask`` parser, with the option strings of each of its options."""
    parser = _cli._parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {
        name: [a.option_strings for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
        for name, p in sub.choices.items()
    }


def _global_options() -> list[list[str]]:
    return [
        a.option_strings
        for a in _cli._parser()._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction)
    ]


def _magic_forms() -> dict[str, list[str]]:
    """The words ``%bgtask`` takes, from the table of commands, each with the options it offers."""
    return {
        c.name: [o.flags[0] for o in c.offered(_table.MAGIC)] for c in _table.COMMANDS if _table.MAGIC in c.forms
    }


def _cell_options() -> list[str]:
    return [o.flags[0] for o in _table.CELL.offered(_table.MAGIC)]


# -- every public name is documented ---------------------------------------------------------------


def test_every_public_name_has_a_heading() -> None:
    reference, _ = _parts()
    missing = _missing(sorted(bg.__all__), _heading_spans(reference), "bg.")
    assert not missing, _report("names of nbbgtask.__all__ (a heading with `bg.NAME`)", missing)


def test_every_exception_has_a_heading() -> None:
    reference, _ = _parts()
    headings = _heading_spans(reference)
    missing = [n for n in _errors.__all__ if not any(_starts(s, "bg." + n) or s == n for s in headings)]
    assert not missing, _report("exceptions (a heading with `bg.NAME`, or `NAME` if not exported)", missing)


def test_every_task_status_member_is_documented() -> None:
    reference, _ = _parts()
    members = [n for n in dir(bg.TaskStatus) if not n.startswith("_")]
    assert "result" in members and "cancel" in members  # the list is read from the class
    missing = _missing(members, _spans(reference), "status.")
    assert not missing, _report("members of TaskStatus (a code span `status.NAME`)", missing)


def test_every_state_is_documented() -> None:
    reference, _ = _parts()
    names = [*bg.State.__members__, *(n for n in vars(bg.State) if not n.startswith("_") and n not in bg.State.__members__)]
    missing = _missing(names, _spans(reference), "bg.State.", "state.")
    assert not missing, _report("members of State (a code span `bg.State.NAME` or `state.NAME`)", missing)


def test_every_configure_parameter_is_documented_with_its_default() -> None:
    reference, _ = _parts()
    spans = set(_spans(reference))
    parameters = inspect.signature(bg.configure).parameters.values()
    wanted = [f"{p.name}={p.default!r}" for p in parameters]
    missing = [w for w in wanted if w not in spans]
    assert not missing, _report("configure parameters (a code span `NAME=DEFAULT`)", missing)


def test_every_subcommand_and_its_options_are_documented() -> None:
    reference, _ = _parts()
    headings = _heading_spans(reference)
    missing = []
    for name, options in _subcommands().items():
        spans = [s for s in headings if _starts(s, f"nbbgtask {name}")]
        if not spans:
            missing.append(f"nbbgtask {name}")
        for spellings in options:
            if spans and not any(o in s for s in spans for o in spellings):
                missing.append(f"nbbgtask {name} {'/'.join(spellings)}")
    for spellings in _global_options():
        if not any(_starts(s, "nbbgtask [") and any(o in s for o in spellings) for s in headings):
            missing.append(f"nbbgtask {'/'.join(spellings)}")
    assert _subcommands(), "the parser has no subcommands: the test reads the wrong thing"
    assert not missing, _report("command-line subcommands or options (a heading `nbbgtask SUB [OPTIONS]`)", missing)


def test_every_magic_form_is_documented() -> None:
    reference, _ = _parts()
    headings = _heading_spans(reference)
    forms = _magic_forms()
    assert {"list", "show", "cancel"} <= set(forms), f"the magic's forms were not found in its code: {forms}"
    missing = []
    for word, options in sorted(forms.items()):
        spans = [s for s in headings if _starts(s, f"%bgtask {word}")]
        if not spans:
            missing.append(f"%bgtask {word}")
        missing += [f"%bgtask {word} {o}" for o in options if spans and not any(o in s for s in spans)]
    cell = [s for s in headings if _starts(s, "%%bgtask")]
    if not cell:
        missing.append("%%bgtask")
    missing += [f"%%bgtask {o}" for o in _cell_options() if cell and not any(o in s for s in cell)]
    assert not missing, _report("magic forms or options (a heading `%bgtask WORD [OPTIONS]`)", missing)


# -- what is listed as not yet available is really missing ----------------------------------------------


def test_what_is_listed_as_not_yet_available_does_not_exist() -> None:
    _, not_yet = _parts()
    leads = re.findall(r"^- \*\*(.+?)\*\*", not_yet, flags=re.MULTILINE)
    if not leads:  # everything is built: the section says so
        assert "Nothing" in not_yet, f"{NOT_YET}: list what is not built as '- **...**' items, or say 'Nothing'"
        return
    subcommands, forms = _subcommands(), _magic_forms()
    built = []
    for span in (s for lead in leads for s in _spans(lead)):
        if m := re.match(r"bg\.(\w+)", span):
            exists = hasattr(bg, m[1])
        elif m := re.match(r"status\.(\w+)", span):
            exists = hasattr(bg.TaskStatus, m[1])
        elif m := re.match(r'start_method="(\w+)"', span):
            exists = m[1] in _config.START_METHODS
        elif m := re.match(r"nbbgtask (\w+)", span):
            exists = m[1] in subcommands
        elif m := re.match(r"%bgtask (\w+)", span):
            exists = m[1] in forms
        else:
            raise AssertionError(f"{NOT_YET}: {span!r} in a bold lead is not a name this test can check")
        if exists:
            built.append(span)
    assert not built, (
        f"{API_MD.name} lists these as not yet available, but they exist: document them in the reference "
        f"and take them off the list: " + ", ".join(built)
    )


#: how the code says a feature is not built yet ("reading its stack is not available for Dask tasks yet")
NOT_YET_MESSAGE = re.compile(r"\bnot\b[^.:;]*?\bavailable\b[^.:;]*?\byet\b|\bnot yet (?:available|built|supported)\b", re.I)


def _docstrings(tree: ast.AST) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, kinds) and node.body and isinstance(node.body[0], ast.Expr)
    }


def _not_yet_in_code() -> dict[str, str]:
    """Each message in nbbgtask's code that says something is not available yet: the clause of
    the string literal (an f-string's fixed text) that says so -> the file and line."""
    found: dict[str, str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in skip:
                continue
            for clause in re.split(r"[.:;]\s", node.value):
                if NOT_YET_MESSAGE.search(clause):
                    found[" ".join(clause.split())] = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
    return found


def test_what_the_code_says_is_not_available_yet_is_what_the_docs_list() -> None:
    """Issue 22: the list said "Nothing" while Dask's ``stack()`` raised "not available yet"."""
    _, not_yet = _parts()
    in_code = _not_yet_in_code()
    quoted = {" ".join(q.split()) for q in re.findall(r'"([^"]+)"', not_yet)}
    in_docs = {q for q in quoted if NOT_YET_MESSAGE.search(q)}
    unlisted = {m: where for m, where in in_code.items() if m not in in_docs}
    assert not unlisted, (
        f"the code says these are not available yet, but {API_MD.name}'s {NOT_YET!r} does not quote "
        f"them: " + "; ".join(f'"{m}" ({where})' for m, where in sorted(unlisted.items()))
    )
    gone = sorted(in_docs - set(in_code))
    assert not gone, f"{API_MD.name}'s {NOT_YET!r} quotes messages the code no longer gives: {gone}"
    leads = re.findall(r"^- \*\*(.+?)\*\*", not_yet, flags=re.MULTILINE)
    assert not (leads and re.match(r"\s*Nothing\b", not_yet)), f"{NOT_YET} lists items, yet begins 'Nothing'"
