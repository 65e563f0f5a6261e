"""Config of issue 12's semantics: default deadlines on every route (overridable, null turns
one off), backend idle_timeout, request-field rules layered Gateway -> route -> app with
errors at file:line, cache isolation, and the fields a reload cannot apply."""

from __future__ import annotations

from sluice.control.config.build import passthrough_config
from sluice.control.runtime.reloader import restart_required
from sluice.proxy.snapshot import DEFAULT_DENIER, DEFAULT_TIMEOUTS, StreamTimeouts

from tests.control.fixtures import GATEWAY, KEY_HASH, Writer, built, issues_of

BARE_GATEWAY = f"""\
kind: Gateway
backends:
  - {{name: vllm, urls: ["http://127.0.0.1:8100"]}}
routes:
  - {{model: chat, backend: vllm, preset: precise, policy: chat}}
  - {{model: bare, backend: vllm}}
apps:
  - {{name: bot, keys: ["{KEY_HASH}"]}}
"""


def test_every_route_has_default_deadlines(config_dir: Writer) -> None:
    snap = built(config_dir({"gateway.yaml": BARE_GATEWAY})).snapshot
    assert snap.routes["bare"].policy.timeouts == DEFAULT_TIMEOUTS
    assert snap.routes["chat"].policy.timeouts == DEFAULT_TIMEOUTS  # its Policy sets none
    passthrough = passthrough_config("http://127.0.0.1:8100").snapshot
    assert passthrough.fallback_route is not None
    assert passthrough.fallback_route.policy.timeouts == DEFAULT_TIMEOUTS


def test_gateway_timeouts_override_defaults_and_null_turns_one_off(config_dir: Writer) -> None:
    gateway = BARE_GATEWAY + "timeouts: {first_token: 10s, inter_token: null}\n"
    policy = "kind: Policy\nstop: ['###']\ntimeouts: {total: 5s, response_head: null}\n"
    snap = built(config_dir({"gateway.yaml": gateway, "chat.yaml": policy})).snapshot
    assert snap.routes["bare"].policy.timeouts == StreamTimeouts(
        first_token=10.0, inter_token=None, total=600.0, response_head=60.0
    )
    # The policy's own total wins; the default first_token (10 s) gives way to it.
    assert snap.routes["chat"].policy.timeouts == StreamTimeouts(
        first_token=5.0, inter_token=None, total=5.0, response_head=None
    )


def test_inconsistent_gateway_timeouts_are_errors_at_their_line(config_dir: Writer) -> None:
    gateway = BARE_GATEWAY + "timeouts: {first_token: 20m, total: 10m}\n"
    assert issues_of(config_dir({"gateway.yaml": gateway})) == [
        "presets/gateway.yaml:9:25: timeouts.first_token: first_token 1200s > total 600s"
    ]


def test_backend_idle_timeout(config_dir: Writer) -> None:
    gateway = BARE_GATEWAY.replace(
        'urls: ["http://127.0.0.1:8100"]}', 'urls: ["http://127.0.0.1:8100"], idle_timeout: 2500ms}'
    )
    snap = built(config_dir({"gateway.yaml": gateway})).snapshot
    assert snap.backends["vllm"].idle_timeout == 2.5
    assert built(config_dir()).snapshot.backends["vllm"].idle_timeout == 4.0


def test_request_fields_are_layered_gateway_route_app(config_dir: Writer) -> None:
    gateway = f"""\
kind: Gateway
request_fields: {{logit_bias: deny, user: {{force: anonymous}}}}
backends:
  - {{name: vllm, urls: ["http://127.0.0.1:8100"]}}
routes:
  - {{model: chat, backend: vllm, request_fields: {{priority: allow, user: allow}}}}
  - {{model: bare, backend: vllm}}
apps:
  - {{name: bot, keys: ["{KEY_HASH}"], request_fields: {{logit_bias: allow, priority: deny}}}}
"""
    snap = built(config_dir({"gateway.yaml": gateway})).snapshot
    bare = snap.routes["bare"].request_fields
    assert dict(bare.denied) == {
        "priority": DEFAULT_DENIER,
        "chat_template": DEFAULT_DENIER,
        "kv_transfer_params": DEFAULT_DENIER,
        "vllm_xargs": DEFAULT_DENIER,
        "background": DEFAULT_DENIER,
        "logit_bias": "the Gateway's request_fields",
    }
    assert dict(bare.forced) == {"user": "anonymous"}
    chat = snap.routes["chat"].request_fields
    assert "priority" not in chat.denied and dict(chat.forced) == {}
    bot_chat = snap.app_field_rules[("bot", "chat")]
    assert bot_chat.denied["priority"] == "app 'bot'" and "logit_bias" not in bot_chat.denied


def test_request_field_mistakes_point_at_the_key(config_dir: Writer) -> None:
    gateway = GATEWAY.replace(
        "policy: chat}",
        "policy: chat, request_fields: {temperature: deny, model: allow, x: {force: null}}}",
    )
    issues = issues_of(config_dir({"gateway.yaml": gateway}))
    assert len(issues) == 3
    assert issues[0].startswith("presets/gateway.yaml:5:")
    assert "request_fields.temperature: temperature is a sampling field" in issues[0]
    assert "policy.temperature" in issues[0]
    assert "request_fields.model: model cannot have a request-field rule" in issues[1]
    assert "request_fields.x: force needs a value" in issues[2]
    gateway = GATEWAY.replace("policy: chat}", "policy: chat, request_fields: {y: maybe}}")
    (issue,) = issues_of(config_dir({"gateway.yaml": gateway}))
    assert issue.startswith("presets/gateway.yaml:5:")
    assert issue.endswith(
        "routes[0].request_fields.y: unknown mode 'maybe'; expected allow, deny or {force: value}"
    )


def test_cache_isolation(config_dir: Writer) -> None:
    snap = built(config_dir()).snapshot
    assert snap.cache_isolation and snap.cache_salt_key is None  # the generated key
    off = GATEWAY + "cache_isolation: {mode: off}\n"
    assert not built(config_dir({"gateway.yaml": off})).snapshot.cache_isolation
    named = GATEWAY + "cache_isolation: {secret: env:SALT_SECRET_UNSET_HERE}\n"
    config = built(config_dir({"gateway.yaml": named}))
    assert config.snapshot.cache_salt_key is None
    assert any("SALT_SECRET_UNSET_HERE is unset" in str(w) for w in config.warnings)
    wrong = GATEWAY + "cache_isolation: {secret: 'sha256:" + "ab" * 32 + "'}\n"
    (issue,) = issues_of(config_dir({"gateway.yaml": wrong}))
    assert "cache_isolation.secret: expected env:VAR" in issue


def test_fields_a_reload_cannot_apply(config_dir: Writer) -> None:
    first = built(config_dir())
    moved = GATEWAY + "listen: {port: 9001}\nrecords: {path: null}\n"
    second = built(config_dir({"gateway.yaml": moved}))
    assert restart_required(first, second) == ["listen.port", "records"]
    assert restart_required(first, first) == []
    store = "limits: {store: redis://127.0.0.1:9/0, lease: 5s, store_timeout: 2s, keep_idle: 1s}\n"
    third = built(config_dir({"gateway.yaml": GATEWAY + store}))
    assert restart_required(first, third) == [
        "limits.store",
        "limits.lease",
        "limits.store_timeout",
        "limits.keep_idle",
    ]


def test_a_forced_value_no_json_body_can_carry_is_an_error_at_its_line(config_dir: Writer) -> None:
    # A forced priority of 10**35 passed `sluice check` and then failed every request on the
    # route with a 500 (orjson encodes 64-bit integers only); a forced .inf went as null.
    gateway = GATEWAY.replace(
        "policy: chat}",
        "policy: chat, request_fields: {priority: {force: 100000000000000000000000000000000000},"
        " vllm_xargs: {force: {a: [1, .inf]}}}}",
    )
    issues = issues_of(config_dir({"gateway.yaml": gateway}))
    assert len(issues) == 2, issues
    assert all(issue.startswith("presets/gateway.yaml:5:") for issue in issues)
    assert "request_fields.priority.value: 1000000000000" in issues[0]
    assert "does not fit in 64 bits" in issues[0]
    assert "request_fields.vllm_xargs.value: inf is not a finite number" in issues[1]
    gateway = GATEWAY.replace(
        "policy: chat}",
        "policy: chat, request_fields: {priority: {force: -9223372036854775808},"
        " vllm_xargs: {force: {a: [1, 2.5, true, null, x]}}}}",
    )
    snap = built(config_dir({"gateway.yaml": gateway})).snapshot
    assert dict(snap.routes["chat"].request_fields.forced) == {
        "priority": -(2**63),
        "vllm_xargs": {"a": [1, 2.5, True, None, "x"]},
    }
