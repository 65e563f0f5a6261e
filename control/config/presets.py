"""Presets: GenerationConfig vocabulary -> vLLM request fields, `extends`, per-field policy.

The one mapping table (rendered by `mapping_table()`; a test keeps this copy equal):

| GenerationConfig | vLLM request | Notes |
|---|---|---|
| `max_new_tokens` | `max_tokens` | integer >= 1; also governs chat's `max_completion_tokens` |
| `min_new_tokens` | `min_tokens` | integer >= 0 |
| `do_sample` | `temperature` | `false`: greedy, sent as `temperature: 0`; `true` sends nothing |
| `temperature` | `temperature` | number >= 0 |
| `top_p` | `top_p` | number in (0, 1] |
| `top_k` | `top_k` | integer >= 1 (omit for all tokens) |
| `min_p` | `min_p` | number in [0, 1] |
| `repetition_penalty` | `repetition_penalty` | number > 0; 1 is none |
| `presence_penalty` | `presence_penalty` | OpenAI field; extra key in generation_config.json |
| `frequency_penalty` | `frequency_penalty` | OpenAI field; extra key in generation_config.json |
| `num_return_sequences` | `n` | integer >= 1 |
| `seed` | `seed` | integer; extra key in generation_config.json |
| `stop_strings` | `stop` | string or list of strings |
| `stop_token_ids` | `stop_token_ids` | token ids; extra key in generation_config.json |

Every other GenerationConfig field is an error naming the field and why (`UNSUPPORTED`):
vLLM would otherwise ignore it and ops would believe it applied.

A preset's `policy` says per field what a request may do: `default` (the request may
override; also what a field without a policy gets), `force` (the request's value is
replaced), `deny` (a request that sets it gets 400), `{clamp: [min, max]}` (numeric fields:
the request's value is clamped; null is an open bound). `SamplingPlan` carries the result in
vLLM field names.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sluice.proxy.snapshot import ClampBounds, SamplingPlan

from .schema import FieldPolicy, PresetFile

Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class FieldMapping:
    name: str  # GenerationConfig field
    vllm: str  # vLLM request body field
    numeric: bool
    integer: bool
    note: str

    def to_vllm(self, value: Any) -> Any:
        """The request value this field sends; None when it sends nothing."""
        if self.name == "do_sample":
            return 0.0 if value is False else None
        return value


def _m(name: str, vllm: str, kind: str, note: str) -> FieldMapping:
    return FieldMapping(name, vllm, kind in ("int", "float"), kind == "int", note)


EXTRA = "extra key in generation_config.json"
MAPPING: tuple[FieldMapping, ...] = (
    _m("max_new_tokens", "max_tokens", "int",
       "integer >= 1; also governs chat's `max_completion_tokens`"),
    _m("min_new_tokens", "min_tokens", "int", "integer >= 0"),
    _m("do_sample", "temperature", "bool",
       "`false`: greedy, sent as `temperature: 0`; `true` sends nothing"),
    _m("temperature", "temperature", "float", "number >= 0"),
    _m("top_p", "top_p", "float", "number in (0, 1]"),
    _m("top_k", "top_k", "int", "integer >= 1 (omit for all tokens)"),
    _m("min_p", "min_p", "float", "number in [0, 1]"),
    _m("repetition_penalty", "repetition_penalty", "float", "number > 0; 1 is none"),
    _m("presence_penalty", "presence_penalty", "float", f"OpenAI field; {EXTRA}"),
    _m("frequency_penalty", "frequency_penalty", "float", f"OpenAI field; {EXTRA}"),
    _m("num_return_sequences", "n", "int", "integer >= 1"),
    _m("seed", "seed", "int", f"integer; {EXTRA}"),
    _m("stop_strings", "stop", "list", "string or list of strings"),
    _m("stop_token_ids", "stop_token_ids", "list", f"token ids; {EXTRA}"),
)  # fmt: skip
MAPPING_BY_NAME: Mapping[str, FieldMapping] = MappingProxyType({m.name: m for m in MAPPING})


@dataclass(frozen=True, slots=True)
class Unsupported:
    reason: str
    neutral: tuple[Any, ...] = ()  # values that change nothing: dropped (with a note) on import


def _unsupported() -> dict[str, Unsupported]:
    beam = "a preset does not select beam search (vLLM's is the request field use_beam_search)"
    runtime = "a runtime option of transformers' generate(), not a sampling setting vLLM takes"
    table = {
        "num_beams": Unsupported(f"{beam} (1, no beam search, is what vLLM does)", (1,)),
        "num_beam_groups": Unsupported(beam, (1,)),
        "diversity_penalty": Unsupported(beam, (0, 0.0)),
        "length_penalty": Unsupported(f"it applies to beam search only; {beam}", (1, 1.0)),
        "early_stopping": Unsupported(f"it applies to beam search only; {beam}", (False,)),
        "constraints": Unsupported(beam),
        "force_words_ids": Unsupported(beam),
        "typical_p": Unsupported("vLLM has no typical-p sampling", (1, 1.0)),
        "epsilon_cutoff": Unsupported("vLLM has no epsilon sampling", (0, 0.0)),
        "eta_cutoff": Unsupported("vLLM has no eta sampling", (0, 0.0)),
        "top_h": Unsupported("vLLM has no top-h sampling"),
        "penalty_alpha": Unsupported("contrastive search is not available in vLLM"),
        "dola_layers": Unsupported("DoLa decoding is not available in vLLM"),
        "guidance_scale": Unsupported("classifier-free guidance is not in vLLM", (1, 1.0)),
        "no_repeat_ngram_size": Unsupported(
            "vLLM has no n-gram blocking; a Policy's repetition_guard ends a looping stream",
            (0,),
        ),
        "encoder_no_repeat_ngram_size": Unsupported("encoder-decoder generation only", (0,)),
        "encoder_repetition_penalty": Unsupported("encoder-decoder generation only", (1, 1.0)),
        "exponential_decay_length_penalty": Unsupported("vLLM has no length decay penalty"),
        "max_length": Unsupported(
            "it counts prompt and output tokens; vLLM limits the output: use max_new_tokens"
        ),
        "min_length": Unsupported(
            "it counts prompt and output tokens; vLLM counts the output: use min_new_tokens",
            (0,),
        ),
        "max_time": Unsupported("use a Policy's timeouts.total"),
        "bad_words_ids": Unsupported("vLLM takes bad words as strings, not token ids"),
        "suppress_tokens": Unsupported("token suppression is not in vLLM's OpenAI API"),
        "begin_suppress_tokens": Unsupported("token suppression is not in vLLM's OpenAI API"),
        "sequence_bias": Unsupported("sequence bias is not in vLLM's OpenAI API"),
        "forced_bos_token_id": Unsupported("forced tokens are not in vLLM's OpenAI API"),
        "forced_eos_token_id": Unsupported("forced tokens are not in vLLM's OpenAI API"),
        "token_healing": Unsupported("token healing is not in vLLM", (False,)),
        "watermarking_config": Unsupported("watermarking is not in vLLM"),
        "renormalize_logits": Unsupported(runtime, (False,)),
        "remove_invalid_values": Unsupported(runtime, (False,)),
        "use_cache": Unsupported(runtime, (True,)),
        "low_memory": Unsupported(runtime, (False,)),
        "output_attentions": Unsupported(runtime, (False,)),
        "output_hidden_states": Unsupported(runtime, (False,)),
        "output_scores": Unsupported(runtime, (False,)),
        "output_logits": Unsupported(runtime, (False,)),
        "return_dict_in_generate": Unsupported(runtime, (False,)),
    }
    for name in (
        "cache_implementation", "cache_config", "compile_config", "disable_compile",
        "max_cache_len", "prefill_chunk_size", "continuous_batching_config", "is_assistant",
        "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
        "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
        "assistant_ensemble_weight", "prompt_lookup_num_tokens", "max_matching_ngram_size",
        "speculation_type", "use_mtp",
    ):  # fmt: skip
        table[name] = Unsupported(runtime)
    return table


UNSUPPORTED: Mapping[str, Unsupported] = MappingProxyType(_unsupported())
# Model metadata in generation_config.json: vLLM reads it from the model, a preset needn't.
METADATA_KEYS = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        "transformers_version",
        "_from_model_config",
    }
)


def mapping_table() -> str:
    """The mapping as a Markdown table (the module docstring and docs/CONFIG.md hold it)."""
    rows = ["| GenerationConfig | vLLM request | Notes |", "|---|---|---|"]
    rows += [f"| `{m.name}` | `{m.vllm}` | {m.note} |" for m in MAPPING]
    return "\n".join(rows)


# --- checks of one document -------------------------------------------------------------


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def preset_document_issues(preset: PresetFile) -> list[tuple[Path, str]]:
    """Rules of one Preset document that need the mapping table."""
    issues: list[tuple[Path, str]] = []
    for name, rule in preset.policy.items():
        mapping = MAPPING_BY_NAME.get(name)
        if mapping is None:
            if name in UNSUPPORTED:
                why = UNSUPPORTED[name].reason
            else:
                why = "not a generation field" + _did_you_mean(name, list(MAPPING_BY_NAME))
            issues.append((("policy", name), f"no policy for {name!r}: {why}"))
            continue
        if rule.mode == "clamp" and rule.clamp is not None:
            if not mapping.numeric:
                issues.append(
                    (("policy", name, "clamp"), f"clamp needs a numeric field; {name} is not")
                )
            elif mapping.integer and any(
                isinstance(b, float) and not b.is_integer() for b in rule.clamp
            ):
                issues.append(
                    (("policy", name, "clamp"), f"{name} is an integer: clamp bounds must be too")
                )
    if "do_sample" in preset.policy and "temperature" in preset.policy:
        issues.append(
            (
                ("policy", "do_sample"),
                "do_sample and temperature both set the policy of vLLM's temperature; keep one",
            )
        )
    gen = preset.generation
    if gen.do_sample is False and gen.temperature is not None:
        issues.append(
            (
                ("generation", "temperature"),
                "temperature has no effect with do_sample: false (greedy decoding, sent as "
                "temperature 0); remove one of them",
            )
        )
    return issues


# --- extends and the sampling plan ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PresetProblem:
    preset: str  # the preset whose document holds `path`
    path: Path
    message: str


@dataclass(frozen=True, slots=True)
class ResolvedPreset:
    """A preset after `extends`, in both vocabularies."""

    name: str
    description: str
    chain: tuple[str, ...]  # the preset, then its parents, nearest first
    generation: Mapping[str, Any]  # GenerationConfig fields, inherited ones included
    policy: Mapping[str, FieldPolicy]  # explicit per-field policies, inherited ones included
    origins: Mapping[str, str]  # field -> preset that set its value or policy
    plan: SamplingPlan


def _chain(
    name: str, presets: Mapping[str, PresetFile], broken: set[str]
) -> tuple[tuple[str, ...] | None, PresetProblem | None]:
    """name, parent, grandparent...; None when it cannot be resolved (and why, if here)."""
    chain = [name]
    while (parent := presets[chain[-1]].extends) is not None:
        if parent in chain:
            cycle = chain[chain.index(parent) :]
            if name != min(cycle):
                return None, None  # reported once, at the cycle's first name
            text = " -> ".join([*cycle, parent])
            return None, PresetProblem(name, ("extends",), f"cycle: {text}")
        if parent not in presets:
            if parent in broken or chain[-1] != name:
                return None, None  # the parent's own error, or reported at the child
            known = sorted(presets)
            hint = _did_you_mean(parent, known) or f" (known: {', '.join(known) or 'none'})"
            return None, PresetProblem(name, ("extends",), f"unknown preset {parent!r}{hint}")
        chain.append(parent)
    return tuple(chain), None


def resolve_presets(
    presets: Mapping[str, PresetFile], broken: set[str]
) -> tuple[dict[str, ResolvedPreset], list[PresetProblem]]:
    """Every preset that resolves, and the problems of those that don't."""
    resolved: dict[str, ResolvedPreset] = {}
    problems: list[PresetProblem] = []
    for name in sorted(presets):
        chain, problem = _chain(name, presets, broken)
        if problem is not None:
            problems.append(problem)
        if chain is None:
            continue
        result = _resolve(chain, presets, problems)
        if result is not None:
            resolved[name] = result
    return resolved, problems


def _resolve(
    chain: tuple[str, ...], presets: Mapping[str, PresetFile], problems: list[PresetProblem]
) -> ResolvedPreset | None:
    values: dict[str, tuple[Any, int]] = {}  # field -> (value, index in chain)
    rules: dict[str, tuple[FieldPolicy, int]] = {}
    for depth in reversed(range(len(chain))):  # root first, so nearer presets override
        doc = presets[chain[depth]]
        for field_name, value in doc.generation.model_dump(exclude_none=True).items():
            values[field_name] = (value, depth)
        for field_name, rule in doc.policy.items():
            if field_name in MAPPING_BY_NAME:
                rules[field_name] = (rule, depth)
    before = len(problems)
    _reconcile_greedy(chain, values, problems)
    if "do_sample" in rules and "temperature" in rules:
        # One field each in different presets: the nearer one decides vLLM's temperature.
        drop = "temperature" if rules["do_sample"][1] < rules["temperature"][1] else "do_sample"
        del rules[drop]
    plan = _plan(chain, values, rules, problems)
    if len(problems) > before:
        return None
    origins = {f: chain[d] for f, (_, d) in values.items()}
    origins.update({f: chain[d] for f, (_, d) in rules.items() if f not in origins})
    return ResolvedPreset(
        name=chain[0],
        description=presets[chain[0]].description,
        chain=chain,
        generation=MappingProxyType({f: v for f, (v, _) in _ordered(values).items()}),
        policy=MappingProxyType({f: r for f, (r, _) in _ordered(rules).items()}),
        origins=MappingProxyType(origins),
        plan=plan,
    )


def _ordered(fields: dict[str, Any]) -> dict[str, Any]:
    return {m.name: fields[m.name] for m in MAPPING if m.name in fields}


def _reconcile_greedy(
    chain: tuple[str, ...], values: dict[str, tuple[Any, int]], problems: list[PresetProblem]
) -> None:
    """do_sample: false and a temperature both map to vLLM's temperature: the nearer wins."""
    if "do_sample" not in values or "temperature" not in values:
        return
    (sample, sample_depth), (_, temp_depth) = values["do_sample"], values["temperature"]
    if sample is not False:
        return
    if sample_depth < temp_depth:
        del values["temperature"]  # a greedy child of a sampling parent
    elif temp_depth < sample_depth:
        problems.append(
            PresetProblem(
                chain[temp_depth],
                ("generation", "temperature"),
                f"temperature has no effect: do_sample: false is inherited from preset "
                f"{chain[sample_depth]!r}; add do_sample: true to sample",
            )
        )


def _plan(
    chain: tuple[str, ...],
    values: dict[str, tuple[Any, int]],
    rules: dict[str, tuple[FieldPolicy, int]],
    problems: list[PresetProblem],
) -> SamplingPlan:
    # Keyed by vLLM field. After _reconcile_greedy at most one of do_sample/temperature
    # sends a value and at most one carries a policy, so no key is written twice.
    sent: dict[str, tuple[Any, int, str]] = {}
    for name, (value, depth) in values.items():
        mapping = MAPPING_BY_NAME[name]
        converted = mapping.to_vllm(tuple(value) if isinstance(value, list) else value)
        if converted is not None:
            sent[mapping.vllm] = (converted, depth, name)
    governed = {MAPPING_BY_NAME[n].vllm: (rule, d, n) for n, (rule, d) in rules.items()}
    defaults: dict[str, Any] = {}
    forced: dict[str, Any] = {}
    clamps: dict[str, ClampBounds] = {}
    denied: set[str] = set()
    for vllm in dict.fromkeys(m.vllm for m in MAPPING):
        value, value_depth, value_field = sent.get(vllm, (None, -1, ""))
        if vllm not in governed:
            if value is not None:
                defaults[vllm] = value
            continue
        rule, rule_depth, rule_field = governed[vllm]
        if rule.mode == "force":
            if value is None:
                problems.append(
                    PresetProblem(
                        chain[rule_depth],
                        ("policy", rule_field),
                        f"force needs a value: set generation.{rule_field} here or in a parent",
                    )
                )
            else:
                forced[vllm] = value
        elif rule.mode == "deny":
            denied.add(vllm)
            if value is not None:
                forced[vllm] = value  # the request may not set it: the preset's value is final
        else:
            if rule.mode == "clamp" and rule.clamp is not None:
                clamps[vllm] = _clamp_bounds(rule.clamp, MAPPING_BY_NAME[rule_field].integer)
                if value is not None and not _inside(value, rule.clamp):
                    # Blame the nearer of the two: that is the edit that broke it.
                    path: Path
                    if value_depth <= rule_depth:
                        where, path = value_depth, ("generation", value_field)
                    else:
                        where, path = rule_depth, ("policy", rule_field, "clamp")
                    shown = values[value_field][0]
                    if isinstance(shown, bool):
                        shown = str(shown).lower()
                    text = f"{value_field} {shown} is outside the clamp {_bounds_text(rule.clamp)}"
                    problems.append(PresetProblem(chain[where], path, text))
            if value is not None:
                defaults[vllm] = value
    return SamplingPlan(
        name=chain[0],
        defaults=MappingProxyType(defaults),
        forced=MappingProxyType(forced),
        clamps=MappingProxyType(clamps),
        denied=frozenset(denied),
    )


def _clamp_bounds(bounds: tuple[Any, Any], integer: bool) -> ClampBounds:
    """Bounds as the request sends them: integers for integer fields (YAML `1024.0` is 1024),
    floats for the others (a bound is never truncated to the request value's type)."""
    cast = int if integer else float
    low, high = bounds
    return (None if low is None else cast(low), None if high is None else cast(high))


def _inside(value: Any, bounds: tuple[Any, Any]) -> bool:
    low, high = bounds
    return (low is None or value >= low) and (high is None or value <= high)


def _bounds_text(bounds: tuple[Any, Any]) -> str:
    return "[" + ", ".join("null" if b is None else str(b) for b in bounds) + "]"
