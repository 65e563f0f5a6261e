"""Experiments: sticky assignment by header, user field or app; random when the key is
absent; stickiness across a reload that keeps the weights; 50/50 -> 60/40 moves ~10% of
keys, all of them towards the variant that grew; the response headers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sluice.control.config.build import BuiltConfig
from sluice.proxy.routing import BUCKETS, assign_variant, bucket_of
from sluice.proxy.snapshot import NO_PRESET, Experiment, Variant

from tests.apps.fixtures import SUPPORT_KEY, AppsProxy, build, chat, digest, write_config
from tests.fixtures import ProcessServer, SimClient

GATEWAY = """\
kind: Gateway
backends:
  - {{name: sim, urls: ["{sim}"]}}
routes:
  - {{model: chat, backend: sim, upstream_model: sim-model, preset: precise}}
apps:
  - {{name: support, keys: ["{key}"]}}
experiments:
  - name: temp-test
    route: chat
    sticky: {sticky}
    variants:
      - {{name: a, preset: precise, weight: {a}}}
      - {{name: b, preset: creative, weight: {b}}}
records: {{path: null}}
"""
USERS = [f"user-{i}" for i in range(1000)]


def config(
    tmp_path: Path,
    sim: ProcessServer,
    *,
    a: int = 50,
    b: int = 50,
    sticky: str = "header:x-user-id",
    extra: dict[str, str] | None = None,
    name: str = "presets",
) -> BuiltConfig:
    text = GATEWAY.format(sim=sim.url, key=digest(SUPPORT_KEY), sticky=sticky, a=a, b=b)
    return build(write_config(tmp_path / name, text, extra))


@pytest.fixture
def experiment_proxy(tmp_path: Path, fast_sim: ProcessServer) -> Iterator[AppsProxy]:
    proxy = AppsProxy(config(tmp_path, fast_sim))
    yield proxy
    proxy.close()


def variants_of(url: str, users: list[str]) -> dict[str, tuple[str, str, str]]:
    """user -> (variant, preset, config version), one non-stream request each."""

    def one(user: str) -> tuple[str, tuple[str, str, str]]:
        resp = chat(
            client, url, SUPPORT_KEY, stream=False, max_tokens=1, headers={"x-user-id": user}
        )
        assert resp.status_code == 200, resp.text
        h = resp.headers
        return user, (h["x-sluice-variant"], h["x-sluice-preset"], h["x-sluice-config"])

    # One client for all threads: building an httpx.Client costs ~20 ms of CPU.
    with httpx.Client(timeout=10) as client, ThreadPoolExecutor(16) as pool:
        return dict(pool.map(one, users))


def test_response_headers_and_the_preset_sent(
    experiment_proxy: AppsProxy, fast_sim: ProcessServer
) -> None:
    sim_client = SimClient(fast_sim.url)
    sim_client.reset()
    seen = variants_of(experiment_proxy.url, USERS[:40])
    assert {v for v, _, _ in seen.values()} == {"a", "b"}
    for variant, preset, _ in seen.values():
        assert preset == {"a": "precise", "b": "creative"}[variant]
    temperatures = Counter(r["body"]["temperature"] for r in sim_client.requests())
    assert set(temperatures) == {0.3, 0.9}
    assert sum(temperatures.values()) == 40
    exchanges = experiment_proxy.harness.wait_finished(40)
    assert {(ex.experiment, ex.variant) for ex in exchanges} == {
        ("temp-test", "a"),
        ("temp-test", "b"),
    }


def test_a_refusal_after_routing_names_the_variant_its_record_names(
    experiment_proxy: AppsProxy,
) -> None:
    """A request refused once its variant is chosen (here for its `stream` flag) answers
    with the variant and preset headers, as every answer of the route does, and as its
    record says (they were missing on 400s and 429s)."""
    expected = variants_of(experiment_proxy.url, USERS[:4])
    for user in USERS[:4]:
        resp = httpx.post(
            experiment_proxy.url + "/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": 1},
            headers={"Authorization": f"Bearer {SUPPORT_KEY}", "x-user-id": user},
            timeout=10,
        )
        assert resp.status_code == 400, resp.text
        got = (resp.headers.get("x-sluice-variant"), resp.headers.get("x-sluice-preset"))
        assert got == expected[user][:2], (user, dict(resp.headers))
    refused = [ex for ex in experiment_proxy.harness.wait_finished(8) if ex.status == 400]
    assert len(refused) == 4 and all(ex.variant in ("a", "b") for ex in refused)


def test_a_key_always_gets_the_same_variant(experiment_proxy: AppsProxy) -> None:
    first = variants_of(experiment_proxy.url, USERS[:100])
    again = variants_of(experiment_proxy.url, USERS[:100])
    assert first == again


def test_stickiness_survives_a_reload_that_keeps_the_weights(
    tmp_path: Path, fast_sim: ProcessServer, experiment_proxy: AppsProxy
) -> None:
    before = variants_of(experiment_proxy.url, USERS)
    # A new version: another preset file and a changed temperature, the same weights.
    changed = {
        "creative.yaml": "kind: Preset\ngeneration: {temperature: 0.8, max_new_tokens: 6}\n",
        "extra.yaml": "kind: Preset\ngeneration: {temperature: 0.5}\n",
    }
    reloaded = config(tmp_path, fast_sim, extra=changed, name="reloaded")
    assert reloaded.version != experiment_proxy.built.version
    experiment_proxy.swap(reloaded)
    after = variants_of(experiment_proxy.url, USERS)
    assert {v[2] for v in after.values()} == {reloaded.version}
    assert {u: v[0] for u, v in before.items()} == {u: v[0] for u, v in after.items()}


def test_50_50_to_60_40_moves_about_ten_percent_and_only_towards_a(
    tmp_path: Path, fast_sim: ProcessServer, experiment_proxy: AppsProxy
) -> None:
    before = variants_of(experiment_proxy.url, USERS)
    experiment_proxy.swap(config(tmp_path, fast_sim, a=60, b=40, name="sixty"))
    after = variants_of(experiment_proxy.url, USERS)
    moved = [u for u in USERS if before[u][0] != after[u][0]]
    assert all(before[u][0] == "b" and after[u][0] == "a" for u in moved)
    assert 0.07 <= len(moved) / len(USERS) <= 0.13, len(moved)
    share_a = sum(1 for v in after.values() if v[0] == "a") / len(USERS)
    assert abs(share_a - 0.60) < 0.04


def _experiment(*weights: int) -> Experiment:
    variants = tuple(Variant(chr(ord("a") + i), NO_PRESET, None, w) for i, w in enumerate(weights))
    return Experiment("exp", "chat", "header", "x-user-id", variants)


def test_weight_change_moves_exactly_the_share_that_moved() -> None:
    keys = [f"k{i}" for i in range(20_000)]
    even, sixty = _experiment(50, 50), _experiment(60, 40)
    moved = sum(assign_variant(even, k).name != assign_variant(sixty, k).name for k in keys)
    assert abs(moved / len(keys) - 0.10) < 0.01
    # By buckets, exactly 10%: buckets [5000, 6000) changed owner, and only those.
    changed = [b for b in range(BUCKETS) if (b * 100 < 50 * BUCKETS) != (b * 100 < 60 * BUCKETS)]
    assert changed == list(range(5000, 6000))


@pytest.mark.xfail(
    strict=True,
    reason="proxy/routing.py lays variants out in consecutive bucket ranges: with three or "
    "more variants a weight change moves keys between variants whose weight did not change",
)
def test_three_variants_move_only_the_share_that_moved() -> None:
    keys = [f"k{i}" for i in range(20_000)]
    # c gives 10 points to a; b keeps 30. Needed: 10% of keys move (c -> a). Consecutive
    # ranges [0,20)[20,50)[50,100) -> [0,30)[30,60)[60,100) move 20% (b -> a and c -> b).
    three, shifted = _experiment(20, 30, 50), _experiment(30, 30, 40)
    moved = sum(assign_variant(three, k).name != assign_variant(shifted, k).name for k in keys)
    assert abs(moved / len(keys) - 0.10) < 0.01


def test_buckets_are_spread_evenly_and_depend_on_the_experiment() -> None:
    keys = [f"user-{i}" for i in range(20_000)]
    counts = Counter(bucket_of("exp", k) * 10 // BUCKETS for k in keys)
    assert all(abs(n - 2000) < 200 for n in counts.values()), counts
    other = sum(bucket_of("exp", k) == bucket_of("other", k) for k in keys)
    assert other < 20  # independent experiments split users independently


def test_without_a_key_assignment_is_random_by_weight() -> None:
    exp = _experiment(70, 30)
    counts = Counter(assign_variant(exp, None).name for _ in range(20_000))
    assert abs(counts["a"] / 20_000 - 0.70) < 0.02


def test_requests_without_the_header_are_split_at_random(experiment_proxy: AppsProxy) -> None:
    with httpx.Client(timeout=10) as client:
        got = Counter(
            chat(client, experiment_proxy.url, SUPPORT_KEY, stream=False, max_tokens=1).headers[
                "x-sluice-variant"
            ]
            for _ in range(200)
        )
    assert 60 <= got["a"] <= 140  # binomial(200, 0.5): 100 +- 14 at 3 sd


def test_sticky_by_user_field(tmp_path: Path, fast_sim: ProcessServer) -> None:
    proxy = AppsProxy(config(tmp_path, fast_sim, sticky="user"))
    try:
        with httpx.Client(timeout=10) as client:
            for user in ("alice", "bob", "carol", "dave"):
                got = {
                    chat(
                        client, proxy.url, SUPPORT_KEY, stream=False, max_tokens=1, user=user
                    ).headers["x-sluice-variant"]
                    for _ in range(5)
                }
                assert len(got) == 1
                expected = assign_variant(proxy.built.snapshot.experiments["temp-test"], user).name
                assert got == {expected}
    finally:
        proxy.close()


def test_sticky_by_app(tmp_path: Path, fast_sim: ProcessServer) -> None:
    proxy = AppsProxy(config(tmp_path, fast_sim, sticky="app"))
    try:
        with httpx.Client(timeout=10) as client:
            got = {
                chat(
                    client,
                    proxy.url,
                    SUPPORT_KEY,
                    stream=False,
                    max_tokens=1,
                    headers={"x-user-id": f"u{i}"},
                ).headers["x-sluice-variant"]
                for i in range(20)
            }
        expected = assign_variant(proxy.built.snapshot.experiments["temp-test"], "support").name
        assert got == {expected}
    finally:
        proxy.close()
