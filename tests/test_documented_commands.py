"""Every ``biasedit`` command the README and docs/ show in a code block parses with today's command line.

A documented command that names a flag which no longer exists, or leaves out a required option, is a broken
instruction for whoever copies it. The commands are parsed, not run: optional parts in ``[...]`` are dropped,
trailing ``# comments`` cut, ``\\`` continuations joined, and a placeholder value, a lone capital letter (``--seed S``)
or a shell variable (``--rank $r``), read as ``0``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from biasedit_peft.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
CODE_BLOCK = re.compile(r"```[a-z]*\n(.*?)```", re.S)


def documented_commands(markdown: str) -> list[str]:
    """The ``biasedit ...`` lines of ``markdown``'s fenced code blocks, continuations joined, comments cut."""
    commands = []
    for block in CODE_BLOCK.findall(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("biasedit "):
                commands.append(re.sub(r"\s+#.*$", "", line))
    return commands


def command_arguments(command: str) -> list[str]:
    """The argv after ``biasedit`` of one documented command: ``[...]`` parts dropped, placeholder values (``S``,
    ``$r``) -> ``0``."""
    words = shlex.split(re.sub(r"\[[^\]]*\]", "", command))[1:]
    return ["0" if re.fullmatch(r"[A-Z]|\$\w+", word) else word for word in words]


def parses(parser, command: str) -> bool:
    """Whether ``command`` parses (when not, argparse prints why on stderr)."""
    try:
        parser.parse_args(command_arguments(command))
    except SystemExit:
        return False
    return True


def test_the_reader_finds_commands_in_code_blocks_only_and_the_parser_refuses_a_broken_one(capsys):
    markdown = ("Run `biasedit demo` in prose.\n```bash\nbiasedit demo --seed S --out runs/seed-S   # a comment\n"
                "biasedit export-lora --model PATH --adapter a/ \\\n    --out lora/ --rank $r\n"
                "biasedit sweep-layers --model PATH --budget 2\npython -m something\n```\n")
    commands = documented_commands(markdown)
    assert commands == ["biasedit demo --seed S --out runs/seed-S",
                        "biasedit export-lora --model PATH --adapter a/      --out lora/ --rank $r",
                        "biasedit sweep-layers --model PATH --budget 2"]
    assert command_arguments(commands[0]) == ["demo", "--seed", "0", "--out", "runs/seed-S"]
    assert command_arguments(commands[1]) == ["export-lora", "--model", "PATH", "--adapter", "a/", "--out", "lora/",
                                              "--rank", "0"]
    assert command_arguments("biasedit bench [--sections speed] --out b") == ["bench", "--out", "b"]
    parser, _ = build_parser()
    assert [parses(parser, command) for command in commands] == [True, True, False]  # --out is required
    assert not parses(parser, "biasedit demo --no-such-flag")
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_documented_command_parses(document):
    parser, _ = build_parser()
    commands = documented_commands((ROOT / document).read_text(encoding="utf-8"))
    broken = [command for command in commands if not parses(parser, command)]
    assert not broken, f"{document}: commands today's CLI refuses:\n" + "\n".join(broken)


def test_the_readme_and_docs_show_commands_of_every_kind():
    """The check above cannot pass by reading nothing: the documents show the main sub-commands."""
    shown = {command.split()[1] for document in DOCUMENTS
             for command in documented_commands((ROOT / document).read_text(encoding="utf-8"))}
    assert set(COMMANDS) <= shown
