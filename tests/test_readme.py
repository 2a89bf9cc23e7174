"""The README's tied-block example runs as written and ties what it says it ties."""

import re
from pathlib import Path

import jax


def test_readme_tied_block_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Use the tied block.*?```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    exec(code, namespace)  # noqa: S102
    params = namespace["params"]["params"]
    assert set(params["Tied_0"]["block"]["Dense_0"]) == {"kernel", "bias"}
    assert params["Tied_0"]["block"]["Dense_0"]["kernel"].shape == (128, 128)
    assert len(jax.tree_util.tree_leaves(params)) == 6  # embed, head, ONE tied Dense
