"""The commands of README.md, docs/ and experiments/, read as a reader of the pages reads them.

A page tells its reader to run the lines of its ```bash blocks (a line ending in a backslash goes
on on the next) and the `code spans` of its text that are a whole command of ours. Every such
command is run by the tests (tests/test_doc_commands.py), or the page says why it is not, with the
words ``not run by the tests:`` and a reason:

- in the comment of a block's line (``torchrun --nproc_per_node=8 ...   # not run by the tests: needs
  8 GPUs``), for that line;
- in a comment line that opens a block, for every line of the block;
- after a code span, in the same table cell or line of text, for the spans there.

A code span that only names a command (no arguments, ``[optional]`` parts, or ``...`` for what is left
out) is a name, not a command to run.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
         *sorted((REPO / "experiments").glob("*.md"))]
NOT_RUN = "not run by the tests:"
# A line that names one of our commands; each must yield at least one command.
MENTIONS_COMMAND = re.compile(r"python3? -m nanogpt\.|(^|[\s(\"'])nanogpt-[a-z]|\btorchrun\b")
# A code span in the text that is a whole command (NAME-like placeholders are not).
INLINE_COMMAND = re.compile(r"(python3? -m nanogpt\.[a-z_.]+|nanogpt-[a-z]+)( |$)|torchrun ")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Line:
    """One shell line a page shows: where, its text, and why the tests do not run it (None: they do)."""

    where: str  # page:line
    text: str
    not_run: str | None = None
    block: str | None = None  # page:line of its ```bash block; None for a code span in the text
    named: bool = False  # a code span that names a command rather than giving one to run

    def __str__(self) -> str:
        return self.where


@dataclass
class Command:
    """One command of ours on a page: which module, its arguments, and torchrun's when launched by it."""

    line: Line
    module: str  # e.g. train, report, text.gpt2_files
    args: list[str]
    torchrun: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)  # VAR=value words before it

    @property
    def where(self) -> str:
        return self.line.where

    @property
    def named(self) -> bool:
        return self.line.named

    def __str__(self) -> str:
        return self.where


def reason(comment: str) -> str | None:
    """The reason a comment gives for not running its line (up to a parenthesis it closes), or None."""
    found = re.search(re.escape(NOT_RUN) + r"(.*)", comment, re.I)
    if found is None:
        return None
    given, depth = "", 0
    for char in found.group(1):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            break
        given += char
    given = given.strip(" .:;")
    assert given, f"'{NOT_RUN}' without a reason: {comment}"
    return given


def comment_of(line: str) -> str:
    """The text after the line's first # outside quotes (shlex's reading of a comment)."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[index + 1:]
    return ""


def bash_blocks(page: Path) -> list[list[Line]]:
    """The page's ```bash blocks, each a list of its lines (continued lines joined, comments left out)."""
    name = page.relative_to(REPO)
    blocks, current, pending, start, block_start = [], None, "", 0, 0
    for number, text in enumerate(page.read_text().splitlines(), 1):
        if text.strip().startswith("```"):
            if current is None and text.strip() == "```bash":
                current, block_start = [], number
            elif current is not None:
                blocks.append(current)
                current = None
            continue
        if current is None:
            continue
        if not pending:
            start = number
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        joined, pending = pending + text, ""
        opening = current[0].text if current else ""
        whole_block = reason(opening) if opening.lstrip().startswith("#") else None
        current.append(Line(f"{name}:{start}", joined, reason(comment_of(joined)) or whole_block,
                            block=f"{name}:{block_start}"))
    return [[line for line in block if not line.text.lstrip().startswith("#")] for block in blocks]


def inline_lines(page: Path) -> list[Line]:
    """The `code spans` outside fenced blocks that are a whole command, each with its mark if it has one."""
    name = page.relative_to(REPO)
    text = re.sub(r"```.*?```", lambda block: "\n" * block.group().count("\n"), page.read_text(), flags=re.S)
    found = []
    for span in re.finditer(r"`([^`]+)`", text):
        if not INLINE_COMMAND.match(span.group(1)):
            continue
        command = " ".join(span.group(1).split())
        after = re.split(r"\||\n", text[span.end():], maxsplit=1)[0]  # the rest of its table cell or line
        line = Line(f"{name}:{text[:span.start()].count(chr(10)) + 1}", command, reason(after))
        line.named = " [" in command or "..." in command or not any(c.args for c in commands_of(line))
        found.append(line)
    return found


def substituted(line: str) -> tuple[str, list[str]]:
    """The line with each $(...) replaced by @SUBSTITUTEDn@, and the commands they hold (nested ones too)."""
    text, inner, start = "", [], line.find("$(")
    while start >= 0:
        depth, end = 0, start + 1
        for end in range(start + 1, len(line)):
            depth += {"(": 1, ")": -1}.get(line[end], 0)
            if depth == 0:
                break
        text += line[:start] + f"@SUBSTITUTED{len(inner)}@"
        inner.append(line[start + 2:end])
        line = line[end + 1:]
        start = line.find("$(")
    return text + line, inner


def segments(line: str) -> list[list[str]]:
    """The simple commands of one shell line: split at && || ; |, with each $(...) a command of its own."""
    text, inner = substituted(line)
    result, current = [shlex.split(command, comments=True) for command in inner], []
    for token in shlex.split(text, comments=True):
        if token in ("&&", "||", ";", "|"):
            result.append(current)
            current = []
        else:
            current.append(token)
    return [*result, current]


def command_of(line: Line, words: list[str]) -> Command | None:
    """Our command in one simple shell command, or None if it runs something else."""
    env = {}
    while words and (ENV_ASSIGNMENT.match(words[0]) or words[0] in ("time", "/usr/bin/time", "-v")):
        if ENV_ASSIGNMENT.match(words[0]):
            key, _, value = words[0].partition("=")
            env[key] = value
        words = words[1:]
    if len(words) >= 3 and words[0] in ("python", "python3") and words[1] == "-m":
        if words[2].startswith("nanogpt."):
            return Command(line, words[2].removeprefix("nanogpt."), words[3:], env=env)
    elif words and words[0].startswith("nanogpt-"):
        return Command(line, words[0].removeprefix("nanogpt-"), words[1:], env=env)
    elif words and words[0] == "torchrun":
        module = next((i for i, word in enumerate(words) if word.startswith("nanogpt.")), None)
        if module is None:
            return None
        return Command(line, words[module].removeprefix("nanogpt."), words[module + 1:], words[1:], env)
    return None


def page_lines() -> list[Line]:
    """Every shell line of every page: the blocks' lines, then the text's command spans, page by page."""
    lines = []
    for page in PAGES:
        lines += [line for block in bash_blocks(page) for line in block]
        lines += inline_lines(page)
    return lines


def commands_of(line: Line) -> list[Command]:
    """Our commands on one line (a line may hold several, joined by && or |, or inside $(...))."""
    return [c for simple in segments(line.text) if (c := command_of(line, simple))]


def page_commands() -> tuple[list[Command], list[str]]:
    """Every command of ours on the pages, and the lines that mention one but yielded none."""
    commands, unparsed = [], []
    for line in page_lines():
        try:
            found = commands_of(line)
        except ValueError as error:  # what a shell would refuse too (an unclosed quote)
            unparsed.append(f"{line.where}: {error}: {line.text.strip()}")
            continue
        commands += found
        if not found and line.block and MENTIONS_COMMAND.search(" ".join(sum(segments(line.text), []))):
            unparsed.append(f"{line.where}: {line.text.strip()}")
    return commands, unparsed
