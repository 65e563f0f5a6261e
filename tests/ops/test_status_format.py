"""`sluice status`'s text for a worker of `--workers N`: what covers every worker and what
is only the answering worker's own."""

from __future__ import annotations

from typing import Any

from sluice.control.runtime.status import format_status

APP = {
    "name": "alpha",
    "requests": 24,
    "by_status": {"200": 24},
    "tokens_in": 240,
    "tokens_out": 96,
    "in_flight": 3,
    "queued": 1,
}


def worker_status(**fields: Any) -> dict[str, Any]:
    return {
        "pid": 4242,
        "worker": "1",
        "uptime_s": 12.0,
        "ready": True,
        "config": {"version": "abc123", "source": "presets"},
        "active_streams": 3,
        "backends": [],
        "queues": [],
        "apps": [APP],
        **fields,
    }


def test_a_workers_footer_says_in_flight_and_queued_are_its_own() -> None:
    """The apps' requests and tokens are summed over the workers (multiprocess metrics);
    in flight and queued come from the worker's own limiters."""
    text = format_status("http://127.0.0.1:8000", worker_status())
    footer = text.split("\n\n")[-1]
    assert "requests and tokens" in footer and "cover every worker" in footer
    assert "in flight and queued" in footer and "this worker's own" in footer


def test_one_process_has_no_footer() -> None:
    text = format_status("http://127.0.0.1:8000", worker_status(worker=None))
    assert "worker" not in text.split("\n\n")[-1]
