"""Every code snippet in README.md and docs/ runs, so the docs cannot rot.

Python blocks run in order, one namespace per file (as a reader pastes them into one session), in a
scratch directory. Shell blocks: every ``certify-fx`` command line must parse with the real parser
(subcommands, flags and values exist), and every recipe or script a line names must exist. Blocks
marked ``<!-- no-test -->`` on the line before are shown only (none today).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- no-test -->\n)?```(\w+)\n(.*?)```", re.S)


def _blocks(path: Path, language: str) -> list[str]:
    return [m.group(3) for m in BLOCK.finditer(path.read_text()) if m.group(2) == language and not m.group(1)]


def _shell_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.split("  #")[0].split(" # ")[0].rstrip()
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    return lines


@pytest.mark.parametrize("path", [p for p in DOCS if _blocks(p, "python")], ids=lambda p: p.name)
def test_python_snippets_run(path, tmp_path, monkeypatch):
    from certify_fx.bounds import registry
    from certify_fx.certificates import CERTIFICATE_METHODS
    from certify_fx.losses import LOSSES
    from certify_fx.transforms.passes import PASSES

    tables = (registry.MODULE_RULES, registry.FUNCTION_RULES, registry.METHOD_RULES, PASSES, CERTIFICATE_METHODS,
              LOSSES)
    saved = [dict(t) for t in tables]
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    try:
        for i, code in enumerate(_blocks(path, "python")):
            try:
                exec(compile(code, f"{path.name} python block {i + 1}", "exec"), namespace)
            except Exception as exc:
                pytest.fail(f"{path.name}, python block {i + 1} fails: {type(exc).__name__}: {exc}\n{code}")
    finally:  # a snippet that registers a rule, pass, method or loss must not leak it into other tests
        for table, before in zip(tables, saved):
            table.clear()
            table.update(before)


@pytest.mark.parametrize("path", [p for p in DOCS if _blocks(p, "bash")], ids=lambda p: p.name)
def test_shell_snippets_parse_and_name_existing_files(path):
    from cli.main import build_parser

    parser = build_parser()
    for block in _blocks(path, "bash"):
        for line in _shell_lines(block):
            words = shlex.split(line.replace("[--json]", "--json"))
            for word in words:
                if re.match(r"^(recipes|benchmarks)/\S+\.(yaml|py)$", word):
                    assert (ROOT / word).is_file(), f"{path.name}: {line!r} names a missing file {word}"
            if words[0] == "torchrun":
                words = words[words.index("certify_fx") + 1:]
            elif words[0] == "certify-fx":
                words = words[1:]
            else:
                continue
            try:
                parser.parse_args(words)
            except SystemExit as exc:
                pytest.fail(f"{path.name}: {line!r} does not parse (exit {exc.code})")
