"""README.md and docs/*.md: every python block runs, every command and link points at something real.

The rule (stated in docs/index.md): a fence is ```python (executed here, each block alone in a
fresh namespace, so it must be self-contained and quick), ```bash (shell commands: not executed, but
the modules, console scripts and configs they name must exist) or ```text (anything else: diagrams,
formulas, output, code that needs data or hardware). Any other fence fails, so no python block can
escape execution by being spelt ```py or left bare.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "bash", "text"}
FENCE = re.compile(r"^(\s*)```(.*)$")


def _name(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


def fences(doc: Path) -> list[tuple[str, int, str]]:
    """``(language, line, body)`` of every fenced block of ``doc`` (line: 1-based, of the opening fence)."""
    blocks, current = [], None
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if current is None and match:
            current = (match.group(2).strip(), number, [], match.group(1))
        elif current is not None and match and not match.group(2).strip():
            blocks.append((current[0], current[1], "\n".join(current[2]) + "\n"))
            current = None
        elif current is not None:
            current[2].append(line)
    assert current is None, f"{_name(doc)}:{current[1]}: unclosed fence"
    return blocks


def _python_blocks():
    for doc in DOCS:
        index = 0
        for language, line, body in fences(doc):
            if language == "python":
                index += 1
                yield pytest.param(doc, line, body, id=f"{_name(doc)}-python{index}-line{line}")


PYTHON_BLOCKS = list(_python_blocks())


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_fences_follow_the_rule(doc):
    """Only python, bash and text fences, unindented, so every python block is found and run."""
    for language, line, _ in fences(doc):
        assert language in LANGUAGES, f"{_name(doc)}:{line}: fence ```{language}, use one of {LANGUAGES}"
    text = doc.read_text()
    indented = [n for n, line in enumerate(text.splitlines(), 1) if re.match(r"^\s+```", line)]
    assert not indented, f"{_name(doc)}: indented fences at lines {indented} (write them at column 0)"
    # An independent count: every ```python opening in the raw text is one of the executed blocks.
    executed = sum(1 for param in PYTHON_BLOCKS if param.values[0] == doc)
    assert text.count("```python\n") == executed


@pytest.mark.parametrize("doc, line, code", PYTHON_BLOCKS)
def test_python_block_runs(doc, line, code):
    """Each block runs alone, in a fresh namespace, as written."""
    namespace = {"__name__": "__docs__"}
    exec(compile(code, f"{_name(doc)}:{line}", "exec"), namespace)  # noqa: S102


def _commands(body: str):
    """The shell commands of a bash block: continuation lines joined, comments dropped."""
    for command in body.replace("\\\n", " ").splitlines():
        command = command.split(" #")[0].strip()
        if command and not command.startswith("#"):
            yield command.lstrip("!")


def _check_command(command: str, scripts: set[str]) -> list[str]:
    """What in one shell command names a module, console script, config or config field that does
    not exist."""
    problems = []
    words = shlex.split(command, comments=True)
    for i, word in enumerate(words):
        if word == "-m" and i > 0 and words[i - 1].startswith("python") and i + 1 < len(words):
            module = words[i + 1]
            if module.split(".")[0] in ("wtjax", "experiments") and importlib.util.find_spec(module) is None:
                problems.append(f"no module {module}")
        if word.startswith("wtjax-") and word not in scripts:
            problems.append(f"no console script {word}")
    config = next((w.removeprefix("--config=") for w in words if w.startswith("--config=")), None)
    overrides = [w.removeprefix("--config.").split("=")[0] for w in words if w.startswith("--config.")]
    if config is not None:
        problems += _check_config(config, overrides)
    return problems


def _check_config(value: str, overrides: list[str]) -> list[str]:
    """``--config=<value>`` loads (file or packaged name, with its argument) and has every
    ``--config.<field>`` the command overrides."""
    from wtjax.job import config as cs

    name, _, arg = value.partition(":")
    path = ROOT / name if "/" in name else Path(name)
    try:
        config = cs.load_config_file(path, arg or None)
    except (FileNotFoundError, ValueError, KeyError) as e:
        return [f"--config={value}: {e}"]
    problems = []
    for field in overrides:
        node = config
        for key in field.split("."):
            if not hasattr(node, "keys") or key not in node.keys():
                problems.append(f"--config.{field}: no such field in {value}")
                break
            node = node[key]
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_shell_commands_name_real_modules_and_configs(doc):
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
    problems = []
    for language, line, body in fences(doc):
        if language == "bash":
            for command in _commands(body):
                problems += [f"{_name(doc)}:{line}: {p}" for p in _check_command(command, scripts)]
    assert not problems, "\n".join(problems)


def _slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)  # no headings inside code
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", text, re.M)}


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Pages another branch is writing at the same time (linked already); checked like any other once
# they exist. Remove an entry when its branch is merged.


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_relative_links_resolve(doc):
    """Every relative link names an existing file, and an anchor into a markdown file a heading of it."""
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            problems.append(f"{target}: no file {file}")
        elif anchor and file.exists() and file.suffix == ".md" and anchor not in _anchors(file):
            problems.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not problems, f"{_name(doc)}:\n" + "\n".join(problems)


def _field_row(field) -> str:
    default = (
        "required" if field.name == "name" else "None" if field.default is None else f"`{field.default!r}`"
    )
    return f"| `{field.name}` | {default} | {field.doc} |"


def test_data_fields_table_is_the_one_definition():
    """docs/data.md's table of ``config.data`` fields is ``wtjax.data.fields.FIELDS``, row for row."""
    from wtjax.data.fields import FIELDS, data_config

    page = (ROOT / "docs" / "data.md").read_text()
    section = re.search(r"^## Fields of `config.data`\n(.*?)\n## ", page, re.S | re.M).group(1)
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    expected = [_field_row(f) for f in FIELDS]
    assert rows == expected, "regenerate the table in docs/data.md:\n" + "\n".join(expected)
    assert {f.name for f in FIELDS} == set(data_config("x").keys())  # the table covers every field


def test_every_docs_page_is_listed_in_the_index():
    index = (ROOT / "docs" / "index.md").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert {p for p in pages if f"({p})" not in index} == set()


# Facts of one development machine: its paths, its cores, dates of a measurement, its load.
MACHINE_FACTS = re.compile(
    r"/tmp/|\.\./shared|this machine|load average|\b\d+[- ](?:CPU[- ])?cores?\b|\b20\d\d-\d\d-\d\d\b|\bUTC\b",
    re.I,
)


def test_no_facts_of_one_machine_in_the_library_or_the_docs():
    """Measurements and their machine live in experiments/; the library, README and docs state none."""
    files = [*DOCS, *sorted((ROOT / "wtjax").rglob("*.py"))]
    hits = [
        f"{f.relative_to(ROOT)}:{n}: {line.strip()}"
        for f in files
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if MACHINE_FACTS.search(line)
    ]
    assert not hits, "move these to experiments/ (with their machine):\n" + "\n".join(hits)
