"""docs/CONFIG.md is generated from the schema and real `sluice check` runs; never stale."""

from __future__ import annotations

import pytest
from sluice.control.config import reference

from tests.control.fixtures import REPO

DOC = REPO / "docs" / "CONFIG.md"


def test_config_reference_is_up_to_date() -> None:
    expected = reference.render_reference()
    assert DOC.read_text(encoding="utf-8") == expected, (
        "docs/CONFIG.md is stale: run "
        "`.venv/bin/python -m sluice.control.config.reference --write docs/CONFIG.md`"
    )


def test_base_of_the_mistakes_is_valid() -> None:
    assert reference.check_output({}).startswith("OK presets: version ")


@pytest.mark.parametrize(
    ("title", "files"), [(title, files) for title, files, _ in reference.MISTAKES]
)
def test_each_mistake_is_one_clear_error(title: str, files: dict[str, str]) -> None:
    lines = reference.check_output(files).splitlines()
    assert lines[-1] == "FAILED presets: 1 error", (title, lines)
    assert lines[0].startswith("presets/"), lines


def test_there_are_ten_mistakes_and_the_doc_shows_each() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert len(reference.MISTAKES) == 10
    for number, (title, _, _) in enumerate(reference.MISTAKES, start=1):
        assert f"### {number}. {title}" in text


def test_every_schema_field_has_a_description() -> None:
    from pydantic import BaseModel
    from sluice.control.config import schema

    for value in vars(schema).values():
        if isinstance(value, type) and issubclass(value, BaseModel) and value is not BaseModel:
            for name, info in value.model_fields.items():
                assert info.description, f"{value.__name__}.{name}"
