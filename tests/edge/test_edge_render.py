"""`sluice render`: the committed examples and golden cases are what rendering produces, and
no string from a config file reaches an edge file unchecked. No edge binaries needed.

Golden cases live in tests/edge/golden/*.txt: a config file (YAML, any documents), then for
each output file a line `=== NAME` and its expected text. After an intended change, rewrite
them with `SLUICE_UPDATE_GOLDEN=1 pytest tests/edge/test_edge_render.py` and read the diff.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from sluice.control.config.build import ConfigInvalid, load_config
from sluice.control.edge.render import render
from sluice.control.edge.templates import RenderError, environment
from sluice.control.edge.timing import EdgeTiming, edge_timing

from tests.fixtures import REPO, sluice_cmd

GOLDEN = Path(__file__).resolve().parent / "golden"
SEPARATOR = re.compile(r"^=== (\S+)\n", re.MULTILINE)
KIND_OF = {"sluice.conf": "nginx", "worker.js": "cloudflare", "wrangler.toml": "cloudflare"}
EXAMPLES = {
    "nginx": {"sluice.conf": REPO / "nginx" / "example" / "sluice.conf"},
    "cloudflare": {
        "worker.js": REPO / "cloudflare" / "example" / "worker.js",
        "wrangler.toml": REPO / "cloudflare" / "example" / "wrangler.toml",
    },
}


def rendered(directory: Path, kind: str) -> dict[str, str]:
    built = load_config(directory)
    assert built.gateway is not None
    return dict(render(kind, built, built.gateway).files)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_committed_example_is_what_the_presets_render(kind: str) -> None:
    files = rendered(REPO / "presets", kind)
    assert sorted(files) == sorted(EXAMPLES[kind])
    for name, path in EXAMPLES[kind].items():
        assert files[name] == path.read_text(), (
            f"{path.relative_to(REPO)} is stale: run `sluice render {kind} --config presets "
            f"--out {path.parent.relative_to(REPO)}`"
        )


def _cases() -> list[Path]:
    return sorted(GOLDEN.glob("*.txt"))


@pytest.mark.parametrize("case", _cases(), ids=lambda p: p.stem)
def test_golden_case(case: Path, tmp_path: Path) -> None:
    text = case.read_text()
    parts = SEPARATOR.split(text)
    source, expected = parts[0], dict(zip(parts[1::2], parts[2::2], strict=True))
    (tmp_path / "config.yaml").write_text(source)
    kinds = {KIND_OF[name] for name in expected}
    assert len(kinds) == 1, f"{case.name}: outputs of one renderer per case"
    files = rendered(tmp_path, kinds.pop())
    if os.environ.get("SLUICE_UPDATE_GOLDEN"):
        case.write_text(source + "".join(f"=== {n}\n{t}" for n, t in files.items()))
        return
    assert sorted(files) == sorted(expected)
    for name, want in expected.items():
        assert files[name] == want, f"{case.name}: {name} differs"


def test_every_output_file_has_a_golden_case() -> None:
    covered = set()
    for case in _cases():
        covered |= set(SEPARATOR.findall(case.read_text()))
    assert covered == set(KIND_OF)


# -- nothing unchecked reaches a file ---------------------------------------------------------

NASTY = [
    "api.example.com; include /etc/shadow",
    "api.example.com\n}",
    "$host",
    "a b",
    'a"b',
    "a'b",
    "a{b",
    "a#b",
    "a\\b",
    "",
]


@pytest.mark.parametrize("value", NASTY)
def test_nginx_filter_refuses_what_could_break_out(value: str) -> None:
    template = environment("sluice.edge.nginx").from_string("server_name {{ v|nginx }};")
    with pytest.raises(RenderError):
        template.render(v=value)


def test_a_template_value_without_a_filter_is_refused() -> None:
    template = environment("sluice.edge.nginx").from_string("listen {{ port }};")
    with pytest.raises(RenderError, match="without a filter"):
        template.render(port=8080)


def test_json_filter_output_is_inert_in_javascript() -> None:
    template = environment("sluice.edge.cloudflare").from_string("const S = {{ v|json }};")
    value = {"o": ["</script>\u2028\u2029`${x}`", "\"'\n"]}
    out = template.render(v=value)
    assert out.isascii() and "\n" not in out.split("=", 1)[1].replace("\n", "")
    assert json.loads(out.removeprefix("const S = ").removesuffix(";")) == value


def test_toml_filter_quotes() -> None:
    template = environment("sluice.edge.cloudflare").from_string("x = {{ v|toml }}")
    value = 'a"b\nc\x7f\\ "\n[vars]'
    out = template.render(v=value)
    assert "\n" not in out
    assert tomllib.loads(out) == {"x": value}


FIELD_ATTACKS = [
    ("nginx", "server_name", "api.example.com; include /etc/shadow"),
    ("nginx", "replicas", ["127.0.0.1:8000;\nserver evil:80"]),
    ("nginx", "access_log", "/tmp/log off; include /x"),
    ("nginx", "trusted_proxies", ["0.0.0.0/0; allow all"]),
    ("nginx", "tls", {"cert": "/etc/c.pem;", "key": "/etc/k.pem"}),
    ("nginx", "limit_req", {"rate": "10r/s zone=x"}),
    ("cloudflare", "origin", 'https://o.example.com"; alert(1); "'),
    ("cloudflare", "routes", ['api.example.com/v1/*"\n[vars]']),
    ("cloudflare", "allowed_origins", ["https://a.example.com\nx"]),
    ("cloudflare", "worker_name", 'x"\nmain = "evil.js'),
]


@pytest.mark.parametrize(("section", "field", "value"), FIELD_ATTACKS)
def test_config_values_that_could_inject_are_invalid(
    section: str, field: str, value: object, tmp_path: Path
) -> None:
    base: dict[str, dict[str, object]] = {
        "nginx": {"server_name": "api.example.com"},
        "cloudflare": {
            "worker_name": "w",
            "routes": ["api.example.com/v1/*"],
            "origin": "https://o.example.com",
        },
    }
    edge = {section: {**base[section], field: value}}
    (tmp_path / "gateway.yaml").write_text(json.dumps({"kind": "Gateway", "edge": edge}))
    with pytest.raises(ConfigInvalid):
        load_config(tmp_path)


def test_worker_streams_and_never_logs() -> None:
    worker = EXAMPLES["cloudflare"]["worker.js"].read_text()
    assert "console." not in worker
    for whole_body in (".text()", ".json()", ".arrayBuffer()", ".blob()", ".formData()"):
        assert whole_body not in worker
    assert "new Response(body" in worker


# -- derived values ---------------------------------------------------------------------------


def test_read_timeout_covers_queue_waits_and_the_longest_stream() -> None:
    assert EdgeTiming(600.0, 70.0, 5.0).read_timeout == 600 + 75 + 30
    assert EdgeTiming(None, 0.0, 5.0).read_timeout == 3600 + 5 + 30


def test_example_timeouts_exceed_every_policy_total() -> None:
    built = load_config(REPO / "presets")
    longest = max(p.timeouts.total or 0 for p in built.policies.values())
    conf = EXAMPLES["nginx"]["sluice.conf"].read_text()
    read = max(int(t) for t in re.findall(r"proxy_read_timeout (\d+)s;", conf))
    assert read > longest
    assert f"client_max_body_size {built.snapshot.max_body_bytes};" in conf


def _timing(tmp_path: Path, gateway: str, policies: str = "") -> EdgeTiming:
    (tmp_path / "gateway.yaml").write_text(gateway)
    if policies:
        (tmp_path / "policies.yaml").write_text(policies)
    built = load_config(tmp_path)
    assert built.gateway is not None
    return edge_timing(built, built.gateway)


TIMING_GATEWAY = (
    "kind: Gateway\n"
    "timeouts: {total: 3h}\n"
    "backends: [{name: b, urls: ['http://127.0.0.1:8100'], queue: {max_wait: 10s}}]\n"
)


def test_route_without_a_policy_takes_the_gateways_total(tmp_path: Path) -> None:
    """sluice holds a route without a Policy to the Gateway's timeouts.total (3h here):
    nginx must wait longer than that, not the 1h of "no total"."""
    timing = _timing(tmp_path, TIMING_GATEWAY + "routes: [{model: chat, backend: b}]\n")
    assert timing.longest_total == 3 * 3600
    assert timing.read_timeout == 3 * 3600 + 10 + 5 + 30


def test_policy_without_a_total_takes_the_gateways(tmp_path: Path) -> None:
    routes = "routes: [{model: a, backend: b, policy: p}, {model: c, backend: b, policy: q}]\n"
    policies = (
        "kind: Policy\nname: p\nkeepalive_interval: 5s\n---\n"
        "kind: Policy\nname: q\ntimeouts: {total: 20m}\n"
    )
    assert _timing(tmp_path, TIMING_GATEWAY + routes, policies).longest_total == 3 * 3600


def test_a_total_turned_off_is_unbounded(tmp_path: Path) -> None:
    gateway = TIMING_GATEWAY.replace("{total: 3h}", "{total: null}")
    timing = _timing(tmp_path, gateway + "routes: [{model: chat, backend: b}]\n")
    assert timing.longest_total is None


# -- the command --------------------------------------------------------------------------------


def _sluice(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        sluice_cmd(*args), check=False, capture_output=True, text=True, timeout=60
    )


def test_render_to_stdout_and_to_a_directory(tmp_path: Path) -> None:
    presets = str(REPO / "presets")
    shown = _sluice("render", "nginx", "--config", presets)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == EXAMPLES["nginx"]["sluice.conf"].read_text()
    written = _sluice("render", "cloudflare", "--config", presets, "--out", str(tmp_path / "cf"))
    assert written.returncode == 0, written.stderr
    for name, path in EXAMPLES["cloudflare"].items():
        assert (tmp_path / "cf" / name).read_text() == path.read_text()
    both = _sluice("render", "cloudflare", "--config", presets)
    assert both.stdout.startswith("==> worker.js <==\n")
    assert "\n==> wrangler.toml <==\n" in both.stdout


def test_render_without_the_section_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("kind: Gateway\n")
    result = _sluice("render", "nginx", "--config", str(tmp_path))
    assert result.returncode == 1
    assert "edge.nginx" in result.stderr
    assert result.stdout == ""


def test_render_refuses_an_invalid_config(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text("kind: Gateway\nedge: {nginx: {server_name: 'a b'}}\n")
    result = _sluice("render", "nginx", "--config", str(tmp_path))
    assert result.returncode == 1
    assert "edge.nginx.server_name" in result.stderr


def test_cloudflare_warns_when_queues_outlast_its_idle_limit(tmp_path: Path) -> None:
    (tmp_path / "gateway.yaml").write_text(
        "kind: Gateway\n"
        "backends: [{name: b, urls: ['http://127.0.0.1:8100'], queue: {max_wait: 96s}}]\n"
        "edge:\n"
        "  cloudflare: {worker_name: w, routes: ['a.example.com/v1/*'], origin: 'https://o.example.com'}\n"
    )
    result = _sluice("render", "cloudflare", "--config", str(tmp_path), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "524" in result.stderr  # a 96s queue wait + a 5s connect: past 100s
    assert "origin_secret is not set" in result.stderr


def test_render_prints_the_configs_warnings(tmp_path: Path) -> None:
    """Resume behind nginx with several replicas and no shared store lands on another
    replica (404 stream_not_found): render says so, as check does."""
    (tmp_path / "gateway.yaml").write_text(
        "kind: Gateway\n"
        "backends: [{name: b, urls: ['http://127.0.0.1:8100']}]\n"
        "routes: [{model: chat, backend: b, policy: resumable}]\n"
        "edge: {nginx: {server_name: api.example.com, "
        "replicas: ['10.0.0.1:8000', '10.0.0.2:8000']}}\n"
    )
    (tmp_path / "policy.yaml").write_text("kind: Policy\nname: resumable\nresume_window: 30s\n")
    result = _sluice("render", "nginx", "--config", str(tmp_path), "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "resume_window" in line]
    assert len(lines) == 1, result.stderr
    assert "edge.nginx.replicas" in lines[0] and "warning" in lines[0]
    assert "resumable" in lines[0] and "limits.store" in lines[0]
    assert "no limits.store: each replica admits" in result.stderr  # the other warnings too
    checked = _sluice("check", str(tmp_path))
    assert lines[0] in checked.stdout


def test_no_resume_warning_with_a_shared_store_or_one_replica(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text("kind: Policy\nname: resumable\nresume_window: 30s\n")
    base = (
        "kind: Gateway\n"
        "backends: [{name: b, urls: ['http://127.0.0.1:8100']}]\n"
        "routes: [{model: chat, backend: b, policy: resumable}]\n"
    )
    for extra in (
        "limits: {store: 'redis://127.0.0.1:6379/0'}\n"
        "edge: {nginx: {server_name: a.example.com, replicas: ['10.0.0.1:8000', '10.0.0.2:8000']}}\n",
        "edge: {nginx: {server_name: a.example.com, replicas: ['10.0.0.1:8000']}}\n",
    ):
        (tmp_path / "gateway.yaml").write_text(base + extra)
        built = load_config(tmp_path)
        assert not [w for w in built.warnings if "resume_window" in str(w)], built.warnings
