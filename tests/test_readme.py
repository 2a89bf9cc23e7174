"""The README: short, its tied-block example ties what it says, its commands are the ones CI runs.

(Every python block of the README is also executed by tests/test_docs.py.)
"""

import re
import shlex
from pathlib import Path

import jax

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M).group(1)


def _block(section: str, language: str) -> str:
    return re.search(rf"^```{language}\n(.*?)^```", section, re.S | re.M).group(1)


def test_readme_is_short():
    """Issue 17: what a newcomer needs first; the reference lives in docs/."""
    assert len(README.splitlines()) <= 260


def test_readme_tied_block_example_runs():
    code = _block(_section("The tied block in your model"), "python")
    namespace = {}
    exec(code, namespace)  # noqa: S102
    params = namespace["params"]["params"]
    assert set(params["Tied_0"]["block"]["Dense_0"]) == {"kernel", "bias"}
    assert params["Tied_0"]["block"]["Dense_0"]["kernel"].shape == (128, 128)
    assert len(jax.tree_util.tree_leaves(params)) == 6  # embed, head, ONE tied Dense
    assert "masks" not in namespace["params"]  # masks are made on the fly, never stored


def _ci_command(pattern: str) -> list[str]:
    script = (ROOT / ".ci" / "run").read_text()
    line = next(line for line in script.splitlines() if re.search(pattern, line))
    return shlex.split(line)


def test_readme_test_command_is_what_ci_runs():
    """The README's one-line test command = .ci/run's exported environment + its pytest line."""
    script = (ROOT / ".ci" / "run").read_text()
    env = dict(re.findall(r"^export (\w+)=(\S+)", script, re.M))
    words = shlex.split(_block(_section("Test"), "bash").strip())
    readme_env = dict(w.split("=", 1) for w in words if re.fullmatch(r"[A-Z_]+=\S*", w))
    assert readme_env == env
    assert words[len(readme_env) :] == _ci_command(r"pytest")
