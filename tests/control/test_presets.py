"""Presets: the mapping table, extends, per-field policy -> SamplingPlan."""

from __future__ import annotations

import pytest
from sluice.control.config import presets
from sluice.control.config.schema import GenerationSection

from tests.control.fixtures import Writer, built, issues_of


def preset_dir(config_dir: Writer, **files: str) -> object:
    return config_dir({f"{name}.yaml": text for name, text in files.items()})


def test_mapping_table_is_the_docstring_table() -> None:
    assert presets.mapping_table() in (presets.__doc__ or "")


def test_every_generation_field_has_one_mapping() -> None:
    assert [m.name for m in presets.MAPPING] == list(GenerationSection.model_fields)
    assert not set(presets.MAPPING_BY_NAME) & set(presets.UNSUPPORTED)


def test_plan_in_vllm_vocabulary(config_dir: Writer) -> None:
    text = """\
kind: Preset
generation:
  max_new_tokens: 256
  min_new_tokens: 2
  temperature: 0.7
  top_k: 40
  min_p: 0.05
  num_return_sequences: 1
  seed: 7
  stop_strings: "###"
  stop_token_ids: [128009]
policy:
  max_new_tokens: {clamp: [1, 1024]}
  top_k: force
  seed: deny
  temperature: {clamp: [null, 1.2]}
"""
    plan = built(preset_dir(config_dir, precise=text)).presets["precise"].plan
    assert dict(plan.defaults) == {
        "max_tokens": 256,
        "min_tokens": 2,
        "temperature": 0.7,
        "min_p": 0.05,
        "n": 1,
        "stop": ("###",),
        "stop_token_ids": (128009,),
    }
    assert dict(plan.forced) == {"top_k": 40, "seed": 7}
    assert dict(plan.clamps) == {"max_tokens": (1, 1024), "temperature": (None, 1.2)}
    assert plan.denied == frozenset({"seed"})


def test_greedy_is_temperature_zero(config_dir: Writer) -> None:
    text = "kind: Preset\ngeneration: {do_sample: false, top_p: 0.9}\npolicy: {do_sample: force}\n"
    plan = built(preset_dir(config_dir, greedy=text)).presets["greedy"].plan
    assert dict(plan.forced) == {"temperature": 0.0}
    assert dict(plan.defaults) == {"top_p": 0.9}


def test_do_sample_true_sends_nothing(config_dir: Writer) -> None:
    plan = (
        built(preset_dir(config_dir, s="kind: Preset\ngeneration: {do_sample: true}\n"))
        .presets["s"]
        .plan
    )
    assert dict(plan.defaults) == {}


def test_greedy_child_of_a_sampling_parent(config_dir: Writer) -> None:
    child = "kind: Preset\nextends: precise\ngeneration: {do_sample: false}\n"
    config = built(preset_dir(config_dir, det=child))
    resolved = config.presets["det"]
    assert resolved.chain == ("det", "precise")
    assert "temperature" not in resolved.generation  # dropped: the child is greedy
    assert resolved.plan.defaults["temperature"] == 0.0
    assert resolved.plan.defaults["max_tokens"] == 512  # inherited
    assert resolved.plan.clamps["temperature"] == (0.0, 1.0)  # 0 lies inside it


def test_temperature_under_a_greedy_parent_is_an_error(config_dir: Writer) -> None:
    parent = "kind: Preset\ngeneration: {do_sample: false}\n"
    child = "kind: Preset\nextends: greedy\ngeneration: {temperature: 0.7}\n"
    assert issues_of(preset_dir(config_dir, greedy=parent, warm=child)) == [
        "presets/warm.yaml:3:27: generation.temperature: temperature has no effect: "
        "do_sample: false is inherited from preset 'greedy'; add do_sample: true to sample"
    ]


def test_temperature_and_greedy_in_one_preset(config_dir: Writer) -> None:
    text = "kind: Preset\ngeneration: {do_sample: false, temperature: 0.2}\n"
    (issue,) = issues_of(preset_dir(config_dir, x=text))
    assert issue.startswith("presets/x.yaml:2:45: generation.temperature: temperature has no")


def test_child_overrides_field_by_field(config_dir: Writer) -> None:
    child = """\
kind: Preset
extends: precise
generation: {temperature: 0.9}
policy: {temperature: {clamp: [0.5, 1.5]}, top_p: deny}
"""
    resolved = built(preset_dir(config_dir, creative=child)).presets["creative"]
    assert resolved.plan.defaults == {"max_tokens": 512, "temperature": 0.9}
    assert resolved.plan.forced == {"top_p": 0.9}
    assert resolved.plan.clamps == {"temperature": (0.5, 1.5)}
    assert resolved.origins["top_p"] == "precise"
    assert resolved.origins["temperature"] == "creative"


def test_clamp_min_greater_than_max(config_dir: Writer) -> None:
    text = "kind: Preset\npolicy:\n  temperature: {clamp: [2.0, 1.0]}\n"
    assert issues_of(preset_dir(config_dir, precise=text)) == [
        "presets/precise.yaml:3:24: policy.temperature.clamp: min 2.0 > max 1.0"
    ]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("{clamp: [1]}", "clamp takes [min, max] (null for an open bound)"),
        ("{clamp: [null, null]}", "clamp needs at least one bound"),
        ("{clamp: [a, 1]}", "clamp bounds are numbers or null, got 'a'"),
        ("{clamp: [0, .inf]}", "clamp bounds are finite numbers or null, got inf"),
        ("{clamp: [.nan, 1]}", "clamp bounds are finite numbers or null, got nan"),
        (
            "{clamp: [0, 9223372036854775808]}",
            "fit in 64 bits (-9223372036854775808 to 9223372036854775807)",
        ),
        (
            "forse",
            "unknown policy mode 'forse'; expected default, force, deny or {clamp: [min, max]}",
        ),
        (
            "{force: true}",
            "expected default, force, deny or {clamp: [min, max]}, got a mapping with ['force']",
        ),
    ],
)
def test_bad_policy_modes(config_dir: Writer, rule: str, message: str) -> None:
    text = f"kind: Preset\npolicy:\n  temperature: {rule}\n"
    (issue,) = issues_of(preset_dir(config_dir, precise=text))
    assert issue.endswith(message)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("temperature: .inf", "generation.temperature: Input should be a finite number"),
        ("top_p: .nan", "generation.top_p: Input should be a finite number"),
        ("repetition_penalty: .Inf", "generation.repetition_penalty: Input should be a finite"),
        ("seed: 100000000000000000000000000000000000", "generation.seed: 1000000000000"),
        ("seed: -9223372036854775809", "-9223372036854775809 does not fit in 64 bits"),
        ("max_new_tokens: 9223372036854775808", "does not fit in 64 bits"),
        ("stop_token_ids: [18446744073709551616]", "generation.stop_token_ids[0]: 1844674"),
    ],
)
def test_values_no_json_encoder_or_vllm_takes_are_errors_at_their_line(
    config_dir: Writer, line: str, message: str
) -> None:
    # A seed of 10**35 passed and then failed every request it applied to with a 500
    # (orjson encodes 64-bit integers only); an infinite temperature went to vLLM as null.
    text = f"kind: Preset\ngeneration:\n  {line}\n"
    (issue,) = issues_of(preset_dir(config_dir, precise=text))
    assert issue.startswith("presets/precise.yaml:3:")
    assert message in issue


def test_the_widest_64_bit_values_are_taken(config_dir: Writer) -> None:
    text = "kind: Preset\ngeneration: {seed: -9223372036854775808, max_new_tokens: 9223372036854775807}\n"
    plan = built(preset_dir(config_dir, precise=text)).presets["precise"].plan
    assert plan.defaults["seed"] == -(2**63)
    assert plan.defaults["max_tokens"] == 2**63 - 1


def test_clamp_only_on_numeric_fields(config_dir: Writer) -> None:
    text = "kind: Preset\npolicy:\n  stop_strings: {clamp: [0, 1]}\n  top_k: {clamp: [1.5, 9]}\n"
    assert issues_of(preset_dir(config_dir, precise=text)) == [
        "presets/precise.yaml:3:25: policy.stop_strings.clamp: clamp needs a numeric field; "
        "stop_strings is not",
        "presets/precise.yaml:4:18: policy.top_k.clamp: top_k is an integer: clamp bounds must be too",
    ]


def test_value_must_lie_inside_its_own_clamp(config_dir: Writer) -> None:
    text = "kind: Preset\ngeneration: {temperature: 1.4}\npolicy: {temperature: {clamp: [0, 1]}}\n"
    assert issues_of(preset_dir(config_dir, precise=text)) == [
        "presets/precise.yaml:2:27: generation.temperature: temperature 1.4 is outside the "
        "clamp [0, 1]"
    ]


def test_inherited_clamp_blames_the_nearer_edit(config_dir: Writer) -> None:
    child = "kind: Preset\nextends: precise\npolicy: {max_new_tokens: {clamp: [1, 100]}}\n"
    assert issues_of(preset_dir(config_dir, short=child)) == [
        "presets/short.yaml:3:34: policy.max_new_tokens.clamp: max_new_tokens 512 is outside "
        "the clamp [1, 100]"
    ]


def test_force_needs_a_value(config_dir: Writer) -> None:
    text = "kind: Preset\npolicy: {seed: force}\n"
    assert issues_of(preset_dir(config_dir, precise=text)) == [
        "presets/precise.yaml:2:16: policy.seed: force needs a value: set generation.seed "
        "here or in a parent"
    ]


def test_force_value_may_come_from_a_parent(config_dir: Writer) -> None:
    child = "kind: Preset\nextends: precise\npolicy: {top_p: force}\n"
    assert built(preset_dir(config_dir, c=child)).presets["c"].plan.forced == {"top_p": 0.9}


def test_deny_without_a_value(config_dir: Writer) -> None:
    text = "kind: Preset\npolicy: {seed: deny}\n"
    plan = built(preset_dir(config_dir, precise=text)).presets["precise"].plan
    assert plan.denied == frozenset({"seed"})
    assert dict(plan.forced) == {}


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("num_beams", 4, "a preset does not select beam search"),
        ("typical_p", 0.9, "vLLM has no typical-p sampling"),
        ("no_repeat_ngram_size", 3, "repetition_guard"),
        ("max_length", 100, "use max_new_tokens"),
        ("penalty_alpha", 0.6, "contrastive search"),
    ],
)
def test_unsupported_fields_say_why(
    config_dir: Writer, field: str, value: object, why: str
) -> None:
    text = f"kind: Preset\ngeneration:\n  {field}: {value}\n"
    (issue,) = issues_of(preset_dir(config_dir, precise=text))
    assert issue.startswith(f"presets/precise.yaml:3:3: generation.{field}: {field}: ")
    assert why in issue


def test_policy_on_unknown_or_unsupported_field(config_dir: Writer) -> None:
    text = "kind: Preset\npolicy: {temprature: deny, num_beams: force}\n"
    assert issues_of(preset_dir(config_dir, precise=text)) == [
        "presets/precise.yaml:2:22: policy.temprature: no policy for 'temprature': "
        "not a generation field (did you mean 'temperature'?)",
        "presets/precise.yaml:2:39: policy.num_beams: no policy for 'num_beams': a preset "
        "does not select beam search (vLLM's is the request field use_beam_search) (1, no "
        "beam search, is what vLLM does)",
    ]


def test_unknown_parent(config_dir: Writer) -> None:
    child = "kind: Preset\nextends: precis\n"
    assert issues_of(preset_dir(config_dir, c=child)) == [
        "presets/c.yaml:2:10: extends: unknown preset 'precis' (did you mean 'precise'?)"
    ]


def test_cycle_is_reported_once(config_dir: Writer) -> None:
    directory = preset_dir(
        config_dir,
        a="kind: Preset\nextends: c\n",
        b="kind: Preset\nextends: a\n",
        c="kind: Preset\nextends: b\n",
        d="kind: Preset\nextends: a\n",  # leads into the cycle: no error of its own
        e="kind: Preset\nextends: e\n",
    )
    assert issues_of(directory) == [
        "presets/a.yaml:2:10: extends: cycle: a -> c -> b -> a",
        "presets/e.yaml:2:10: extends: cycle: e -> e",
    ]


def test_child_of_an_invalid_parent_has_no_error_of_its_own(config_dir: Writer) -> None:
    directory = preset_dir(
        config_dir,
        precise="kind: Preset\ngeneration: {temperature: hot}\n",
        child="kind: Preset\nextends: precise\n",
    )
    assert issues_of(directory) == [
        'presets/precise.yaml:2:27: generation.temperature: expected a number, got the string "hot"'
    ]


def test_duplicate_preset_names_point_at_both(config_dir: Writer) -> None:
    directory = preset_dir(config_dir, tuned="kind: Preset\nname: precise\n")
    assert issues_of(directory) == [
        "presets/tuned.yaml:2:7: name: duplicate preset 'precise' "
        "(first defined at presets/precise.yaml:1:1)"
    ]
