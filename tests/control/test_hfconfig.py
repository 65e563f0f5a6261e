"""`sluice preset import|export`, proven against transformers' own GenerationConfig."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from sluice.control.cli import main

from tests.control.fixtures import EXAMPLES, Writer, built

transformers = pytest.importorskip("transformers")
GenerationConfig = transformers.GenerationConfig

METADATA = {"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version"}
NEUTRAL = {"num_beams", "use_cache"}


def sampling_fields(config: Any) -> dict[str, Any]:
    return {
        k: v for k, v in config.to_diff_dict().items() if k not in METADATA and k not in NEUTRAL
    }


@pytest.mark.parametrize(
    "fields",
    [
        {
            "do_sample": True,
            "temperature": 0.3,
            "top_p": 0.9,
            "top_k": 50,
            "repetition_penalty": 1.1,
            "max_new_tokens": 512,
        },
        {"do_sample": False, "max_new_tokens": 64, "min_new_tokens": 4},
        {
            "do_sample": True,
            "temperature": 0.7,
            "min_p": 0.05,
            "stop_strings": ["###", "\n\nUser:"],
            "num_return_sequences": 2,
            "seed": 1234,
        },
    ],
)
def test_round_trip_through_transformers(
    config_dir: Writer, tmp_path: Path, fields: dict[str, Any]
) -> None:
    original = GenerationConfig(**fields, bos_token_id=1, eos_token_id=[2, 3], num_beams=1)
    original.save_pretrained(tmp_path / "model")
    directory = config_dir()

    assert (
        main(["preset", "import", str(tmp_path / "model"), "--name", "hf", "--out", "presets"]) == 0
    )
    assert (directory / "hf.yaml").is_file()
    config = built(directory)  # the imported preset loads in a config directory
    assert set(config.presets["hf"].generation) == set(fields)

    assert main(["preset", "export", "hf", str(tmp_path / "out"), "--config", "presets"]) == 0
    exported = GenerationConfig.from_pretrained(tmp_path / "out")
    assert sampling_fields(exported) == sampling_fields(original)


def test_import_notes_dropped_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "generation_config.json"
    path.write_text(
        json.dumps(
            {
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 0,
                "_from_model_config": True,
                "transformers_version": "4.45.0",
                "do_sample": True,
                "temperature": 0.6,
                "top_p": 0.9,
                "num_beams": 1,
                "top_k": 0,
            }
        )
    )
    assert main(["preset", "import", str(path), "--name", "llama"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[1:] == [
        "kind: Preset",
        "name: llama",
        "generation:",
        "  do_sample: true",
        "  temperature: 0.6",
        "  top_p: 0.9",
    ]
    assert err.splitlines() == [
        "note: dropped num_beams: 1 (no effect)",
        "note: dropped top_k: 0 (no top-k filtering is what omitting it means)",
        "note: dropped model metadata (vLLM reads it from the model): bos_token_id, "
        "eos_token_id, pad_token_id, _from_model_config, transformers_version",
    ]


def test_import_fails_on_unsupported_fields_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"num_beams": 4, "typical_p": 0.9, "temperature": "hot"}))
    assert main(["preset", "import", str(path), "--name", "x"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("sluice preset: cannot import: num_beams: 4: a preset does not")
    assert "typical_p: 0.9: vLLM has no typical-p sampling" in line
    assert 'temperature: expected a number, got the string "hot"' in line


def test_import_name_from_the_model_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "Llama-3.1-8B-Instruct"
    model.mkdir()
    (model / "generation_config.json").write_text('{"temperature": 0.6}')
    assert main(["preset", "import", str(model)]) == 0
    assert "name: Llama-3.1-8B-Instruct\n" in capsys.readouterr().out


def test_import_refuses_to_overwrite(config_dir: Writer, tmp_path: Path) -> None:
    config_dir()
    (tmp_path / "gc.json").write_text('{"temperature": 0.6}')
    assert (
        main(["preset", "import", str(tmp_path / "gc.json"), "--out", "presets/precise.yaml"]) == 1
    )


def test_import_of_greedy_with_temperature_drops_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "g.json").write_text('{"do_sample": false, "temperature": 0.9}')
    assert main(["preset", "import", str(tmp_path / "g.json")]) == 0
    out, err = capsys.readouterr()
    assert "temperature" not in out
    assert "note: dropped temperature: 0.9 (no effect with do_sample: false)" in err


def test_export_errors(
    config_dir: Writer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_dir()
    assert main(["preset", "export", "nope", str(tmp_path / "o"), "--config", "presets"]) == 1
    assert "unknown preset 'nope' (known: precise)" in capsys.readouterr().err
    assert main(["preset", "export", "precise", str(tmp_path / "o"), "--config", "presets"]) == 0
    assert "note: the per-field policy" in capsys.readouterr().err
    assert main(["preset", "export", "precise", str(tmp_path / "o"), "--config", "presets"]) == 1
    assert "already exists" in capsys.readouterr().err
    config_dir({"x.yaml": ""})
    assert main(["preset", "export", "precise", str(tmp_path / "p"), "--config", "presets"]) == 1
    assert "is not valid (1 error)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in EXAMPLES.glob("*.yaml") if "kind: Preset" in p.read_text())
)
def test_every_example_preset_exports_what_transformers_samples_with(
    name: str, tmp_path: Path
) -> None:
    """Loaded with warnings as errors and validated strictly: no "generation flags are not
    valid and may be ignored"; sampling presets carry do_sample: true, greedy ones false."""
    out = tmp_path / name
    assert main(["preset", "export", name, str(out), "--config", str(EXAMPLES)]) == 0
    preset = built(EXAMPLES).presets[name].generation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exported = GenerationConfig.from_pretrained(out)
        exported.validate(strict=True)
    greedy = preset.get("do_sample") is False or preset.get("temperature") == 0
    assert exported.do_sample is (not greedy)
    for field in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
        if field in preset and not (greedy and field in ("temperature", "top_p", "top_k")):
            assert getattr(exported, field) == preset[field], field
