"""Reading the directory: YAML pitfalls, locations, every error at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sluice.control.config.loader import MAX_CONFIG_FILE_BYTES

from tests.control.fixtures import KEY_HASH, Writer, built, issues_of


def test_unknown_key_points_at_the_key_with_a_suggestion(config_dir: Writer) -> None:
    directory = config_dir({"precise.yaml": "kind: Preset\ngeneration:\n  temprature: 0.3\n"})
    assert issues_of(directory) == [
        "presets/precise.yaml:3:3: generation.temprature: unknown key 'temprature' "
        "(did you mean 'temperature'?)"
    ]


def test_every_error_of_every_file_is_reported(config_dir: Writer) -> None:
    directory = config_dir(
        {
            "precise.yaml": "kind: Preset\ngeneration:\n  top_p: 2\n  top_k: 1.5\n",
            "chat.yaml": "kind: Policy\nstop: [1]\ntimeouts: {total: soon}\n",
        }
    )
    assert issues_of(directory) == [
        "presets/chat.yaml:2:8: stop[0]: expected a string, got the number 1",
        "presets/chat.yaml:3:19: timeouts.total: expected a duration (seconds, or like 250ms, "
        "5s, 2m, 1h), got 'soon'",
        "presets/precise.yaml:3:10: generation.top_p: must be <= 1.0, got 2",
        "presets/precise.yaml:4:10: generation.top_k: expected an integer, got the number 1.5",
    ]


def test_duplicate_yaml_key_is_an_error(config_dir: Writer) -> None:
    text = "kind: Preset\ngeneration:\n  temperature: 0.3\n  temperature: 0.9\n"
    directory = config_dir({"precise.yaml": text})
    assert issues_of(directory) == [
        "presets/precise.yaml:4:3: generation.temperature: duplicate key 'temperature' "
        "(first at line 3); YAML would silently keep the last one"
    ]


def test_tab_indentation_names_the_line(config_dir: Writer) -> None:
    directory = config_dir({"precise.yaml": "kind: Preset\ngeneration:\n\ttemperature: 0.3\n"})
    # No follow-on "unknown preset 'precise'" from the route: the file's own error is enough.
    assert issues_of(directory) == [
        "presets/precise.yaml:3:1: tab character used for indentation; YAML allows only spaces"
    ]


@pytest.mark.parametrize(
    ("texts", "why"),
    [
        (("", "# nothing yet\n"), "empty file"),
        # An explicit null document is skipped beside others; alone it configures nothing.
        (("null\n", "--- null\n--- null\n"), "only null"),
    ],
)
def test_a_file_without_a_document_is_an_error(
    config_dir: Writer, texts: tuple[str, str], why: str
) -> None:
    directory = config_dir({"a.yaml": texts[0], "b.yaml": texts[1]})
    message = f"{why}: expected one or more documents with kind: Preset, Policy or Gateway"
    assert issues_of(directory) == [
        f"presets/a.yaml:1:1: {message}",
        f"presets/b.yaml:1:1: {message}",
    ]


def test_syntax_error_has_line_and_column(config_dir: Writer) -> None:
    directory = config_dir({"x.yaml": 'kind: Policy\nname: x\nstop: ["a", \n'})
    (issue,) = issues_of(directory)
    assert issue.startswith("presets/x.yaml:4:1: YAML syntax error: ")


def test_multi_document_file_names_are_required(config_dir: Writer) -> None:
    text = "kind: Preset\ngeneration: {top_k: 5}\n---\nkind: Preset\nname: b\n"
    directory = config_dir({"many.yaml": text})
    assert issues_of(directory) == [
        "presets/many.yaml:1:1: missing required key 'name': this file holds 2 Preset documents"
    ]


def test_multi_document_file_with_names_loads(config_dir: Writer) -> None:
    text = (
        "kind: Preset\nname: a\ngeneration: {top_k: 5}\n---\n---\n"
        "kind: Preset\nname: b\nextends: a\n---\nkind: Policy\nname: p\n"
    )
    config = built(config_dir({"many.yaml": text}))
    assert config.presets["b"].plan.defaults["top_k"] == 5
    assert "p" in config.snapshot.policies


def test_name_defaults_to_the_file_stem(config_dir: Writer) -> None:
    config = built(config_dir())
    assert set(config.presets) == {"precise"}
    assert set(config.snapshot.policies) == {"chat"}


def test_file_stem_that_is_not_a_name(config_dir: Writer) -> None:
    directory = config_dir({"my preset.yaml": "kind: Preset\n"})
    assert issues_of(directory) == [
        "presets/my preset.yaml:1:1: missing required key 'name' "
        "(the file name 'my preset' is not a valid name)"
    ]


def test_kind_problems(config_dir: Writer) -> None:
    directory = config_dir(
        {
            "a.yaml": "name: x\n",
            "b.yaml": "kind: preset\n",
            "c.yaml": "- kind: Preset\n",
        }
    )
    assert issues_of(directory) == [
        "presets/a.yaml:1:1: missing required key 'kind' (Preset, Policy or Gateway)",
        "presets/b.yaml:1:7: kind: unknown kind 'preset'; expected Preset, Policy or Gateway "
        "(did you mean 'Preset'?)",
        "presets/c.yaml:1:1: a document must be a mapping with kind: Preset, Policy or Gateway",
    ]


def test_string_where_a_number_goes(config_dir: Writer) -> None:
    directory = config_dir({"precise.yaml": 'kind: Preset\ngeneration:\n  temperature: "0.3"\n'})
    assert issues_of(directory) == [
        'presets/precise.yaml:3:16: generation.temperature: expected a number, got the string "0.3"'
    ]


def test_yaml_booleans_are_not_strings(config_dir: Writer) -> None:
    # YAML 1.1 reads an unquoted `no` as false: a stop string must be quoted.
    directory = config_dir({"chat.yaml": "kind: Policy\nstop: [no]\n"})
    assert issues_of(directory) == [
        "presets/chat.yaml:2:8: stop[0]: expected a string, got the boolean false"
    ]


def test_missing_required_key_points_at_the_mapping(config_dir: Writer) -> None:
    gateway = "kind: Gateway\nbackends:\n  - urls: ['http://h:1']\n"
    directory = config_dir({"gateway.yaml": gateway}, base=False)
    assert issues_of(directory) == [
        "presets/gateway.yaml:3:5: backends[0].name: missing required key 'name'"
    ]


def test_anchors_and_merge_keys_work(config_dir: Writer) -> None:
    gateway = f"""\
kind: Gateway
backends:
  - &pool {{name: a, urls: ["http://127.0.0.1:1"], max_concurrency: 8}}
  - {{<<: *pool, name: b}}
routes:
  - {{model: chat, backend: a}}
  - {{model: chat2, backend: b}}
apps:
  - {{name: bot, keys: ["{KEY_HASH}"]}}
"""
    config = built(config_dir({"gateway.yaml": gateway}))
    assert config.snapshot.backends["b"].max_concurrency == 8


def test_not_utf8(config_dir: Writer) -> None:
    directory = config_dir()
    (directory / "bad.yaml").write_bytes(b"kind: Policy\nname: \xff\n")
    assert issues_of(directory) == ["presets/bad.yaml:2:1: not UTF-8 text (byte 0xff)"]


def test_hidden_files_are_ignored_and_yml_warns(config_dir: Writer) -> None:
    directory = config_dir({".#precise.yaml": "garbage: [", "old.yml": "kind: Preset\n"})
    config = built(directory)
    assert [str(w) for w in config.warnings] == [
        "presets/old.yml: warning: ignored: only *.yaml files are read"
    ]


def test_missing_directory(tmp_path: Path) -> None:
    assert issues_of(tmp_path / "nope") == [f"{tmp_path / 'nope'}: no such directory"]


def test_alias_bomb_is_bounded(config_dir: Writer) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    directory = config_dir({"bomb.yaml": "kind: Policy\nname: b\n" + "\n".join(lines) + "\n"})
    (issue,) = issues_of(directory)
    assert "more than 200000 values" in issue


def test_a_recursive_alias_is_an_error_with_its_line(config_dir: Writer) -> None:
    """`&g {x: *g}` is endless: it was a RecursionError traceback (and a reload error
    without file:line)."""
    directory = config_dir({"x.yaml": "kind: Preset\ngeneration: &g {temperature: 0.5, x: *g}\n"})
    (issue,) = issues_of(directory)
    assert issue.startswith("presets/x.yaml:2:") and "nested more than 64 levels" in issue


def test_nesting_too_deep_for_the_parser_is_an_error_with_its_line(config_dir: Writer) -> None:
    text = "kind: Preset\n# deep\ngeneration: " + "[" * 10_000 + "]" * 10_000 + "\n"
    (issue,) = issues_of(config_dir({"x.yaml": text}))
    assert issue == "presets/x.yaml:3:1: nested more than 64 levels deep"


def test_a_fifo_or_a_device_named_yaml_is_refused_unread(config_dir: Writer) -> None:
    """Reading a FIFO blocks until a writer comes, and /dev/zero never ends: check and
    reload hung on either."""
    directory = config_dir({})
    os.mkfifo(directory / "f.yaml")
    (directory / "z.yaml").symlink_to("/dev/zero")
    issues = issues_of(directory)
    assert "presets/f.yaml: not a regular file (a FIFO, a device or a socket)" in issues
    assert "presets/z.yaml: not a regular file (a FIFO, a device or a socket)" in issues


def test_a_file_over_the_size_limit_is_refused_unread(config_dir: Writer) -> None:
    directory = config_dir({})
    (directory / "big.yaml").write_bytes(b"#" * (MAX_CONFIG_FILE_BYTES + 1))
    (issue,) = [i for i in issues_of(directory) if "big.yaml" in i]
    assert "over the" in issue
