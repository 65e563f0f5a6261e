"""Value rules: secrets, names, URLs and every string that reaches a rendered edge config."""

from __future__ import annotations

import pytest
from sluice.control.config import values

from tests.control.fixtures import GATEWAY, KEY_HASH, Writer, built, issues_of

PLAINTEXT = (
    "plaintext secret: a key or token in a file must be sha256:<64 hex digits> "
    "(`sluice key new APP` prints one) or env:VAR"
)


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("sk-live-abc123", PLAINTEXT),
        ("sha256:abcd", "sha256: needs 64 hex digits, got 4"),
        ("sha256:" + "zz" * 32, "sha256: needs 64 hex digits (0-9, a-f)"),
        ("env:1BAD", "env: needs a variable name ([A-Za-z_][A-Za-z0-9_]*)"),
    ],
)
def test_bad_secrets_are_rejected_without_echoing_them(
    config_dir: Writer, secret: str, message: str
) -> None:
    directory = config_dir({"gateway.yaml": GATEWAY.replace(KEY_HASH, secret)})
    (issue,) = issues_of(directory)
    assert issue.endswith(f"apps[0].keys[0]: {message}")
    assert "abc123" not in issue


@pytest.mark.parametrize("where", ["admin: {token: %s}", "edge: {origin_secret: %s}"])
def test_plaintext_tokens_are_rejected(config_dir: Writer, where: str) -> None:
    directory = config_dir({"gateway.yaml": GATEWAY + where % "hunter2" + "\n"})
    (issue,) = issues_of(directory)
    assert issue.endswith(PLAINTEXT)
    assert "hunter2" not in issue


def test_secret_of_the_wrong_type_is_not_echoed(config_dir: Writer) -> None:
    directory = config_dir({"gateway.yaml": GATEWAY.replace(f'"{KEY_HASH}"', "123456789")})
    (issue,) = issues_of(directory)
    assert issue.endswith("apps[0].keys[0]: expected a string, got a number")


def test_sha256_is_normalised_to_lower_case(config_dir: Writer) -> None:
    upper = "sha256:" + "AB" * 32
    config = built(config_dir({"gateway.yaml": GATEWAY.replace(KEY_HASH, upper)}))
    assert config.snapshot.apps[0].key_hashes == frozenset({bytes.fromhex("ab" * 32)})


@pytest.mark.parametrize("name", ["a", "precise", "v1.2_beta-3", "A" * 64, "0abc"])
def test_valid_names(name: str) -> None:
    assert values.check_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a b", "a;b", "a" * 65, "ü", "a/b", "a\n"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ValueError, match="not a valid name"):
        values.check_name(name)


@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B-Instruct", "qwen2.5:7b", "chat"])
def test_route_model_names_allow_slash_and_colon(model: str) -> None:
    assert values.check_model(model) == model


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8100", "http://127.0.0.1:8100"),
        ("https://vllm.internal", "https://vllm.internal"),
        ("http://vllm-0.vllm.svc.cluster.local:8000/", "http://vllm-0.vllm.svc.cluster.local:8000"),
        ("http://[::1]:8000", "http://[::1]:8000"),
    ],
)
def test_valid_urls(url: str, expected: str) -> None:
    assert values.check_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:8100",
        "ftp://host",
        "http://host/v1",
        "http://host?x=1",
        "http://user:pw@host",
        "http://host:99999",
        "http://host:",
        "http://ho st",
        "http://host\n",
        "http://host;rm",
        "http://-bad-.com",
        "http://[nothex]:1",
    ],
)
def test_invalid_urls(url: str) -> None:
    with pytest.raises(ValueError):
        values.check_url(url)


INJECTIONS = ["a;b", "a{b", "a}b", 'a"b', "a'b", "a b", "a\nb", "a\tb", "a$b"]


@pytest.mark.parametrize("text", INJECTIONS)
@pytest.mark.parametrize(
    "check",
    [
        values.check_host,
        values.check_server_name,
        values.check_url,
        values.check_origin,
        values.check_host_port,
        values.check_http_path,
        values.check_file_path,
        values.check_rate,
        values.check_worker_name,
        values.check_route_pattern,
        values.check_sticky,
        values.check_upstream_model,
    ],
)
def test_nothing_that_could_break_a_rendered_config_passes(check: object, text: str) -> None:
    with pytest.raises(ValueError):
        check(text)  # type: ignore[operator]


def test_edge_strings_are_validated_in_place(config_dir: Writer) -> None:
    edge = """\
edge:
  nginx:
    server_name: "api.example.com; include /etc/passwd"
    replicas: ["127.0.0.1:8000"]
    tls: {cert: "/etc/ssl/a.pem\\n", key: /etc/ssl/k.pem}
    limit_req: {rate: "20r/s;", burst: 1}
  cloudflare:
    worker_name: Sluice Edge
    routes: ["api.example.com/v1/*\\""]
    origin: "https://origin.example.com/x"
"""
    issues = issues_of(config_dir({"gateway.yaml": GATEWAY + edge}))
    paths = [issue.split(": ")[1] for issue in issues]
    assert paths == [
        "edge.nginx.server_name",
        "edge.nginx.tls.cert",
        "edge.nginx.limit_req.rate",
        "edge.cloudflare.worker_name",
        "edge.cloudflare.routes[0]",
        "edge.cloudflare.origin",
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(5, 5.0), (0.25, 0.25), ("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert values.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        0,
        -1,
        "0s",
        "5 sec",
        "",
        True,
        "1d",
        [5],
        float("nan"),
        float("inf"),
        10**400,
        "9" * 400 + "s",
    ],
)
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        values.parse_duration(text)


@pytest.mark.parametrize(
    ("sticky", "normalised"),
    [("header:X-User-Id", "header:x-user-id"), ("user", "user"), ("app", "app")],
)
def test_sticky(sticky: str, normalised: str) -> None:
    assert values.check_sticky(sticky) == normalised


EDGE_NGINX = """\
edge:
  nginx:
    server_name: api.example.com
    {key}: {value}
"""


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "replicas",
            '["::1:28000"]',
            "replicas[0]: '::1:28000': an IPv6 address goes in brackets, [address]:port, "
            "like [::1]:28000",
        ),
        (
            "replicas",
            '["::1"]',
            "replicas[0]: '::1': an IPv6 address goes in brackets, [address]:port",
        ),
        ("replicas", '["[127.0.0.1]:80"]', "replicas[0]: '127.0.0.1' is not an IPv6 address"),
        ("limit_conn", "100000", "limit_conn: must be <= 65535, got 100000"),
        (
            "access_log",
            "'off'",
            "access_log: 'off' is not a file path here: nginx would read it as turning the "
            "log off and then refuse the log format after it; to discard the log, write "
            "/dev/null",
        ),
        (
            "tls",
            "{cert: /etc/ssl/a.pem, key: /etc/ssl/k.pem, port: 8080}",
            "tls.port: 8080 is also edge.nginx.listen: the plain-HTTP server (health checks, "
            "the redirect to TLS) and the TLS server need two ports",
        ),
    ],
)
def test_edge_nginx_values_that_nginx_refuses_are_refused(
    config_dir: Writer, key: str, value: str, message: str
) -> None:
    edge = EDGE_NGINX.format(key=key, value=value)
    (issue,) = issues_of(config_dir({"gateway.yaml": GATEWAY + edge}))
    at, _, text = issue.partition(": ")
    assert at.startswith("presets/gateway.yaml:11:")
    assert text == f"edge.nginx.{message}"


@pytest.mark.parametrize("replica", ["127.0.0.1:8000", "[::1]:28000", "vllm-0.internal:8000"])
def test_replicas_host_port(replica: str) -> None:
    assert values.check_host_port(replica) == replica


@pytest.mark.parametrize(
    ("origin", "canonical"),
    [
        ("https://App.Example.com", "https://app.example.com"),
        ("https://b.example.com:443", "https://b.example.com"),
        ("http://x:80/", "http://x"),
        ("HTTP://X:8080", "http://x:8080"),
        ("https://x:80", "https://x:80"),
        ("http://[0:0::1]:80", "http://[::1]"),
        ("http://[::ABCD]:8080", "http://[::abcd]:8080"),
        ("*", "*"),
    ],
)
def test_origins_are_normalised_to_what_browsers_send(origin: str, canonical: str) -> None:
    assert values.check_origin(origin) == canonical


def test_allowed_origins_reach_the_worker_normalised(config_dir: Writer) -> None:
    edge = """\
edge:
  cloudflare:
    worker_name: sluice-edge
    routes: ["api.example.com/v1/*"]
    origin: https://origin.example.com
    allowed_origins: ["https://App.Example.com", "https://b.example.com:443"]
"""
    gateway = built(config_dir({"gateway.yaml": GATEWAY + edge})).gateway
    assert gateway is not None and gateway.edge.cloudflare is not None
    assert gateway.edge.cloudflare.allowed_origins == (
        "https://app.example.com",
        "https://b.example.com",
    )


@pytest.mark.parametrize("interval", ["0.1ms", "50ms", 0.01])
def test_a_keepalive_interval_under_100ms_is_refused(config_dir: Writer, interval: object) -> None:
    """0.1ms read as 0 by the renderers, and a keep-alive per loop pass flooded every
    waiting stream."""
    chat = f"kind: Policy\nstop: ['x']\nkeepalive_interval: {interval}\n"
    (issue,) = issues_of(config_dir({"chat.yaml": chat}))
    assert issue.startswith("presets/chat.yaml:3:21: keepalive_interval: ")
    assert "a keep-alive interval must be at least 100ms" in issue
    assert built(config_dir({"chat.yaml": chat.replace(str(interval), "100ms")}))
