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


def _field_row(field) -> str:
    default = (
        "required" if field.name == "name" else "None" if field.default is None else f"`{field.default!r}`"
    )
    return f"| `{field.name}` | {default} | {field.doc} |"


def test_readme_data_fields_table_is_the_one_definition():
    """README.md's table of ``config.data`` fields is ``wtjax.data.fields.FIELDS``, row for row."""
    from wtjax.data.fields import FIELDS, data_config

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = re.search(r"### Fields of `config.data`\n(.*?)\n### ", readme, re.S).group(1)
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    expected = [_field_row(f) for f in FIELDS]
    assert rows == expected, "regenerate the README table:\n" + "\n".join(expected)
    assert {f.name for f in FIELDS} == set(data_config("x").keys())  # the table covers every field
