"""Building the Snapshot: references, secrets, the examples, pass-through, versions."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import MappingProxyType

import pytest
from sluice.control.config.build import (
    ConfigInvalid,
    ConfigIssue,
    load_config,
    passthrough_config,
)
from sluice.proxy.snapshot import NO_POLICY, NO_PRESET, StreamTimeouts
from sluice.proxy.stopwords import CutPattern, GuardSpec, RepetitionGuard

from tests.control.fixtures import EXAMPLES, GATEWAY, KEY_HASH, Writer, built, issues_of

FULL_GATEWAY = f"""\
kind: Gateway
listen: {{host: 0.0.0.0, port: 9000}}
limits: {{max_body_bytes: 65536}}
backends:
  - name: vllm
    urls: ["http://10.0.0.1:8000", "http://10.0.0.2:8000/"]
    max_concurrency: 32
    queue: {{max: 10, max_wait: 250ms}}
    connect_timeout: 2s
    health: {{path: /health, interval: 5s, timeout: 1s}}
routes:
  - {{model: chat, backend: vllm, upstream_model: meta-llama/Llama-3.1-8B-Instruct,
     preset: precise, policy: chat}}
  - {{model: raw, backend: vllm}}
apps:
  - {{name: bot, keys: ["{KEY_HASH}", "env:BOT_KEY"], routes: [chat], max_concurrency: 4,
     queue: {{max: 2, max_wait: 1s}}, default_preset: precise, allow_preset_header: true}}
  - {{name: ops, keys: ["env:OPS_KEY"]}}
experiments:
  - name: t
    route: chat
    sticky: header:X-User-Id
    variants:
      - {{name: a, preset: precise, weight: 1}}
      - {{name: b, preset: precise, policy: chat, weight: 3}}
admin: {{token: env:ADMIN_TOKEN}}
edge: {{origin_secret: "sha256:{"cd" * 32}"}}
"""


def test_example_presets_directory_loads() -> None:
    config = load_config(EXAMPLES)
    snap = config.snapshot
    assert set(config.presets) == {"precise", "creative", "code", "deterministic"}
    assert dict(snap.presets["precise"].defaults) == {
        "max_tokens": 512,
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.1,
    }
    assert snap.presets["deterministic"].forced["temperature"] == 0.0
    assert set(snap.routes) == {"chat", "code"}
    assert snap.routes["chat"].policy.stop == ("###", "\n\nUser:", "\n\nHuman:")
    assert snap.routes["chat"].backend.urls == ("http://127.0.0.1:8100",)
    assert snap.routes["chat"].upstream_model == "sim-model"
    assert snap.routes["chat"].experiment is not None
    digests = {hashlib.sha256(k).digest() for k in (b"sk-demo-support", b"sk-demo-batch")}
    assert set(snap.apps_by_key) == digests
    assert config.gateway is not None and config.gateway.edge.nginx is not None


def test_full_gateway_snapshot(config_dir: Writer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOT_KEY", "sk-bot")
    monkeypatch.setenv("OPS_KEY", "sk-ops")
    monkeypatch.setenv("ADMIN_TOKEN", "admin-secret")
    directory = config_dir({"gateway.yaml": FULL_GATEWAY})
    config = built(directory)
    snap = config.snapshot
    assert (snap.listen_host, snap.listen_port, snap.max_body_bytes) == ("0.0.0.0", 9000, 65536)
    backend = snap.backends["vllm"]
    assert backend.urls == ("http://10.0.0.1:8000", "http://10.0.0.2:8000")
    assert (backend.max_concurrency, backend.connect_timeout) == (32, 2.0)
    assert (backend.queue.max_len, backend.queue.max_wait) == (10, 0.25)
    assert backend.health is not None and backend.health.timeout == 1.0

    chat, raw = snap.routes["chat"], snap.routes["raw"]
    assert chat.upstream_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert chat.preset is snap.presets["precise"] and chat.policy is snap.policies["chat"]
    assert (raw.preset, raw.policy, raw.upstream_model) == (NO_PRESET, NO_POLICY, None)

    bot, ops = snap.apps
    assert bot.key_hashes == {
        bytes.fromhex("ab" * 32),
        hashlib.sha256(b"sk-bot").digest(),
    }
    assert bot.routes == frozenset({"chat"}) and ops.routes is None
    assert (bot.max_concurrency, bot.queue.max_len, bot.queue.max_wait) == (4, 2, 1.0)
    assert bot.default_preset is snap.presets["precise"] and bot.allow_preset_header
    assert snap.apps_by_key[hashlib.sha256(b"sk-ops").digest()] is ops
    assert snap.requires_auth

    experiment = snap.experiments["t"]
    assert chat.experiment is experiment
    assert (experiment.sticky_kind, experiment.sticky_name) == ("header", "x-user-id")
    assert [(v.name, v.weight) for v in experiment.variants] == [("a", 1), ("b", 3)]
    assert experiment.variants[0].policy is None
    assert experiment.variants[1].policy is snap.policies["chat"]

    assert snap.admin_token_hash == hashlib.sha256(b"admin-secret").digest()
    assert snap.origin_secret_hash == bytes.fromhex("cd" * 32)
    assert isinstance(snap.routes, MappingProxyType)
    assert isinstance(snap.presets["precise"].defaults, MappingProxyType)
    assert snap.source == str(directory)
    # Resolved secrets are kept only as digests.
    text = repr(config)
    assert "sk-bot" not in text and "admin-secret" not in text and "sk-ops" not in text


def test_policy_snapshot_has_compiled_guard_and_timeouts(config_dir: Writer) -> None:
    policy = """\
kind: Policy
stop: ["###"]
cut_patterns: [{pattern: "(?i)ignore previous", max_len: 32}]
repetition_guard: {ngram: 4, repeats: 3}
timeouts: {first_token: 500ms, inter_token: 2, total: 1m}
"""
    snap = built(config_dir({"chat.yaml": policy})).snapshot
    chat = snap.policies["chat"]
    # response_head was not set: the default (60 s) applies.
    assert chat.timeouts == StreamTimeouts(
        first_token=0.5, inter_token=2.0, total=60.0, response_head=60.0
    )
    assert chat.cut_patterns == (CutPattern("(?i)ignore previous", 32),)
    assert chat.repetition_guard == RepetitionGuard(4, 3)
    assert isinstance(chat.guard, GuardSpec)


def test_policy_without_text_rules_has_no_guard(config_dir: Writer) -> None:
    snap = built(config_dir({"chat.yaml": "kind: Policy\ntimeouts: {total: 10}\n"})).snapshot
    assert snap.policies["chat"].guard is None


def test_policy_rules(config_dir: Writer) -> None:
    policy = """\
kind: Policy
cut_patterns: [{pattern: "ok"}, {pattern: "(unclosed", max_len: 8}, {pattern: "x", max_len: 0}]
repetition_guard: {ngram: 0, repeats: 1}
timeouts: {first_token: 60s, total: 30s}
"""
    issues = issues_of(config_dir({"chat.yaml": policy}))
    assert issues == [
        "presets/chat.yaml:2:93: cut_patterns[2].max_len: must be >= 1, got 0",
        "presets/chat.yaml:3:27: repetition_guard.ngram: must be >= 1, got 0",
        "presets/chat.yaml:3:39: repetition_guard.repeats: must be >= 2, got 1",
    ]
    policy = policy.replace(', {pattern: "x", max_len: 0}', "").replace(
        "{ngram: 0, repeats: 1}", "{ngram: 4, repeats: 2}"
    )
    issues = issues_of(config_dir({"chat.yaml": policy}))
    assert issues == [
        "presets/chat.yaml:2:43: cut_patterns[1].pattern: cut pattern '(unclosed': invalid "
        "regular expression: missing ) at position 9",
        "presets/chat.yaml:4:25: timeouts.first_token: first_token 60s > total 30s",
    ]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "backend: vllm, preset",
            "backend: vlm, preset",
            "presets/gateway.yaml:5:28: routes[0].backend: unknown backend 'vlm' "
            "(did you mean 'vllm'?)",
        ),
        (
            "preset: precise",
            "preset: precize",
            "presets/gateway.yaml:5:42: routes[0].preset: unknown preset 'precize' "
            "(did you mean 'precise'?)",
        ),
        (
            "policy: chat}",
            "policy: chat-transcript}",
            "presets/gateway.yaml:5:59: routes[0].policy: unknown policy 'chat-transcript' "
            "(known: chat)",
        ),
    ],
)
def test_unknown_references(config_dir: Writer, old: str, new: str, expected: str) -> None:
    assert issues_of(config_dir({"gateway.yaml": GATEWAY.replace(old, new)})) == [expected]


def test_app_and_experiment_references(config_dir: Writer) -> None:
    extra = """\
  - {name: other, keys: ["sha256:%s"], routes: [chat, code], default_preset: nope}
experiments:
  - {name: e1, route: chat, sticky: user, variants: [{name: a, preset: precise, weight: 1},
     {name: b, preset: precise, policy: nope, weight: 1}]}
  - {name: e2, route: chat, sticky: app, variants: [{name: a, preset: precise, weight: 1},
     {name: b, preset: missing, weight: 1}]}
  - {name: e3, route: code, sticky: user, variants: [{name: a, preset: precise, weight: 1},
     {name: b, preset: precise, weight: 1}]}
""" % ("ef" * 32)
    issues = issues_of(config_dir({"gateway.yaml": GATEWAY + extra}))
    assert [i.split(": ", 2)[1:] for i in issues] == [
        ["apps[1].routes[1]", "unknown route 'code' (known: chat)"],
        ["apps[1].default_preset", "unknown preset 'nope' (known: precise)"],
        ["experiments[0].variants[1].policy", "unknown policy 'nope' (known: chat)"],
        [
            "experiments[1].route",
            "route 'chat' already has experiment 'e1'; a route runs one experiment at a time",
        ],
        ["experiments[1].variants[1].preset", "unknown preset 'missing' (known: precise)"],
        ["experiments[2].route", "unknown route 'code' (known: chat)"],
    ]


def test_route_with_every_reference_wrong(config_dir: Writer) -> None:
    route = "backend: nope, preset: nope, policy: nope}"
    issues = issues_of(
        config_dir(
            {
                "gateway.yaml": GATEWAY.replace(
                    "backend: vllm, preset: precise, policy: chat}", route
                )
            }
        )
    )
    assert [i.split(": ")[1] for i in issues] == [
        "routes[0].backend",
        "routes[0].preset",
        "routes[0].policy",
    ]


def test_weights_must_be_positive(config_dir: Writer) -> None:
    extra = """\
experiments:
  - {name: e, route: chat, sticky: user, variants: [{name: a, preset: precise, weight: 0},
     {name: b, preset: precise, weight: 1}]}
"""
    (issue,) = issues_of(config_dir({"gateway.yaml": GATEWAY + extra}))
    assert issue.endswith("experiments[0].variants[0].weight: must be >= 1, got 0")


def test_duplicate_names_inside_the_gateway(config_dir: Writer) -> None:
    extra = f'  - {{name: bot, keys: ["sha256:{"ef" * 32}"]}}\n'
    (issue,) = issues_of(config_dir({"gateway.yaml": GATEWAY + extra}))
    assert issue == "presets/gateway.yaml:8:12: apps[1].name: duplicate name 'bot' (also apps[0])"


def test_same_key_for_two_apps(config_dir: Writer) -> None:
    extra = f'  - {{name: bot2, keys: ["{KEY_HASH}"]}}\n'
    (issue,) = issues_of(config_dir({"gateway.yaml": GATEWAY + extra}))
    assert issue.endswith("apps[1].keys[0]: the same key is also a key of app 'bot'")


def test_two_gateways(config_dir: Writer) -> None:
    (issue,) = issues_of(config_dir({"more.yaml": GATEWAY}))
    assert issue == (
        "presets/more.yaml:1:7: kind: a second Gateway document (first at presets/gateway.yaml:1:1)"
    )


def test_duplicate_policy_across_files(config_dir: Writer) -> None:
    other = "kind: Policy\nname: chat\n---\nkind: Policy\nname: other\n"
    (issue,) = issues_of(config_dir({"zz.yaml": other}))
    assert issue == (
        "presets/zz.yaml:2:7: name: duplicate policy 'chat' (first defined at presets/chat.yaml:1:1)"
    )


def test_unset_env_secrets_are_warnings(
    config_dir: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOPE_KEY", raising=False)
    monkeypatch.delenv("NOPE_ADMIN", raising=False)
    gateway = GATEWAY.replace(f'"{KEY_HASH}"', f'"{KEY_HASH}", env:NOPE_KEY')
    gateway += "admin: {token: env:NOPE_ADMIN}\n"
    config = built(config_dir({"gateway.yaml": gateway}))
    assert [str(w) for w in config.warnings] == [
        "presets/gateway.yaml:7:99: apps[0].keys[1]: warning: env:NOPE_KEY is unset or empty "
        "in this environment; app 'bot' cannot use this key",
        "presets/gateway.yaml:8:16: admin.token: warning: env:NOPE_ADMIN is unset or empty in "
        "this environment; the admin API is disabled",
    ]
    assert config.snapshot.admin_token_hash is None
    assert config.snapshot.apps[0].key_hashes == {bytes.fromhex("ab" * 32)}


def test_apps_without_usable_keys_fail_closed(
    config_dir: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOPE_KEY", raising=False)
    config = built(config_dir({"gateway.yaml": GATEWAY.replace(f'"{KEY_HASH}"', "env:NOPE_KEY")}))
    assert config.snapshot.requires_auth  # a missing variable must not open the gateway
    assert config.snapshot.apps[0].key_hashes == frozenset()


def test_no_apps_warns_that_the_gateway_is_open(config_dir: Writer) -> None:
    gateway = GATEWAY.split("apps:")[0]
    config = built(config_dir({"gateway.yaml": gateway}))
    assert not config.snapshot.requires_auth
    assert "no apps: the gateway accepts requests without an API key" in str(config.warnings[0])


def test_version_is_a_content_hash(config_dir: Writer) -> None:
    directory = config_dir()
    first = built(directory).version
    assert len(first) == 12 and built(directory).version == first
    (directory / "precise.yaml").write_text(
        (directory / "precise.yaml").read_text() + "# a comment\n"
    )
    assert built(directory).version != first


def test_passthrough_config() -> None:
    config = passthrough_config("http://127.0.0.1:8100/")
    snap = config.snapshot
    assert snap.fallback_route is not None
    assert snap.fallback_route.upstream_model is None
    assert snap.fallback_route.backend.urls == ("http://127.0.0.1:8100",)
    assert not snap.requires_auth and not snap.routes
    assert snap.source == "--backend http://127.0.0.1:8100"
    assert len(snap.version) == 12


def test_passthrough_rejects_a_bad_url() -> None:
    with pytest.raises(ConfigInvalid) as info:
        passthrough_config("localhost:8100")
    assert str(info.value).startswith("--backend: 'localhost:8100' is not a URL")


def test_backend_override_without_gateway(config_dir: Writer) -> None:
    directory = config_dir({"gateway.yaml": ""}, base=True)
    (directory / "gateway.yaml").unlink()
    config = built(directory, backend_override="http://127.0.0.1:9")
    snap = config.snapshot
    assert snap.fallback_route is not None and snap.fallback_route.upstream_model is None
    assert snap.fallback_route.backend.urls == ("http://127.0.0.1:9",)
    assert "precise" in snap.presets and not snap.routes
    assert built(directory).version != snap.version  # the override is part of the version
    warning = str(built(directory).warnings[0])
    assert warning == (
        "presets: warning: no Gateway document: nothing is routed unless sluice serve "
        "gets --backend URL"
    )


def test_backend_override_with_gateway_replaces_every_url(config_dir: Writer) -> None:
    snap = built(config_dir(), backend_override="http://127.0.0.1:9").snapshot
    assert snap.backends["vllm"].urls == ("http://127.0.0.1:9",)
    assert snap.routes["chat"].backend.urls == ("http://127.0.0.1:9",)
    assert snap.fallback_route is None


def test_issue_format() -> None:
    issue = ConfigIssue("presets/chat.yaml", 7, 5, "policy.temperature.clamp", "min 2.0 > max 1.0")
    assert str(issue) == "presets/chat.yaml:7:5: policy.temperature.clamp: min 2.0 > max 1.0"
    assert str(ConfigIssue("--backend", None, None, "", "bad")) == "--backend: bad"


def test_paths_outside_the_cwd_are_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "cfg"
    directory.mkdir()
    (directory / "x.yaml").write_text("")
    monkeypatch.chdir(EXAMPLES)
    (issue,) = issues_of(directory)
    assert issue.startswith(f"{directory}/x.yaml:1:1: empty file")


@pytest.mark.parametrize(
    ("value", "expected"), [("0", 0.0), ("250ms", 0.25), ("2s", 2.0), ("10s", 10.0)]
)
def test_keep_idle_takes_a_duration_or_zero(
    config_dir: Writer, value: str, expected: float
) -> None:
    gateway = GATEWAY + f"limits: {{keep_idle: {value}}}\n"
    config = built(config_dir({"gateway.yaml": gateway}))
    assert config.gateway is not None
    assert config.gateway.limits.keep_idle == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [("-1", "a duration must be > 0, got -1"), ("11s", "must be <= 10.0, got 11.0"),
     ("soon", "expected a duration")],
)  # fmt: skip
def test_keep_idle_refuses_what_is_not_a_duration_or_zero(
    config_dir: Writer, value: str, message: str
) -> None:
    gateway = GATEWAY + f"limits: {{keep_idle: {value}}}\n"
    (issue,) = issues_of(config_dir({"gateway.yaml": gateway}))
    assert issue.startswith("presets/gateway.yaml:8:"), issue  # file:line
    assert "limits.keep_idle" in issue and message in issue, issue
