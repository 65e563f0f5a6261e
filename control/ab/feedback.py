"""POST /v1/feedback: an app rates one of its own requests.

    {"request_id": "<x-request-id of the response>", "score": 4.5}
    {"request_id": "<x-request-id of the response>", "label": "good"}   # or "bad"

Authenticated with the app's key, like a completion. Only the app that made a request may
rate it (403 otherwise); an id that is in no record is 404. Rating again replaces the
earlier score or label in the report (all are kept in the store).

The record may not be in the database yet: with several workers (or replicas on one
PostgreSQL) another worker may still buffer it, or wait for the write lock. So an id not
found is looked up again, at growing gaps, until no record submitted before the feedback
came can still be on its way (`write_bound`); only then is it 404.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import orjson
from sluice.proxy.auth import authenticate
from sluice.proxy.errors import ApiError, bad_request, method_not_allowed, not_found
from sluice.proxy.http import Handler, Request, Response
from sluice.proxy.response import JSON_HEADERS
from sluice.proxy.snapshot import SnapshotRef

from .records import BUSY_TIMEOUT, RateResult, RecordWriter, StoreUnavailable

FEEDBACK_PATH = "/v1/feedback"
LABELS = ("good", "bad")
MAX_REQUEST_ID = 128  # as the x-request-id the proxy accepts
MAX_SCORE = 1e6  # |score|: any rating scale; far from where the statistics overflow
FIELDS = frozenset({"request_id", "score", "label"})
# The longest one feedback request waits for a record (the default write bound is 6 s); past
# it, with the record possibly still on its way (a flush interval of minutes), 503.
MAX_LOOKUP_WAIT = 10.0
MAX_RECHECK_GAP = 1.0  # gaps between lookups double from the flush interval up to this


@dataclass(frozen=True, slots=True)
class Feedback:
    request_id: str
    score: float | None = None
    label: str | None = None


def parse_feedback(raw: bytes) -> Feedback:
    """The request body, or a 400 naming the field at fault."""
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    for key in body:
        if key not in FIELDS:
            raise bad_request(
                f"unknown field '{str(key)[:64]}'; expected request_id and score or label",
                param=str(key)[:64],
            )
    request_id = body.get("request_id")
    if (
        not isinstance(request_id, str)
        or not 0 < len(request_id) <= MAX_REQUEST_ID
        or not (request_id.isascii() and request_id.isprintable())
    ):
        # As the proxy takes a client's x-request-id: printable ASCII (a NUL reached
        # PostgreSQL, which refused it, and the client was told to retry later).
        raise bad_request(
            f"'request_id' must be the x-request-id of a response (1-{MAX_REQUEST_ID} "
            "printable ASCII characters)",
            param="request_id",
        )
    score, label = body.get("score"), body.get("label")
    if (score is None) == (label is None):
        raise bad_request("send exactly one of 'score' (a number) or 'label' (good or bad)")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise bad_request("'score' must be a number", param="score")
        if not math.isfinite(score) or abs(score) > MAX_SCORE:
            # Bounded: the report sums squares of scores (1e200 overflowed it).
            raise bad_request(
                f"'score' must be a number from -{MAX_SCORE:g} to {MAX_SCORE:g}", param="score"
            )
        return Feedback(request_id, score=float(score))
    if label not in LABELS:
        raise bad_request('\'label\' must be "good" or "bad"', param="label")
    return Feedback(request_id, label=label)


def write_bound(flush_interval: float) -> float:
    """The longest a record submitted before now can take to reach the database, or to be
    dropped: its writer's next flush, then the wait for another connection's lock, after
    which the writer drops the batch (SQLite's busy timeout). PostgreSQL's inserts wait on
    no lock; the same allowance covers a slow server there.

    Request ids cannot shorten this: their time prefix is that of the batch of 256 ids they
    were drawn from (hours old when traffic is light), and a client may send its own."""
    return flush_interval + BUSY_TIMEOUT


async def rate_when_recorded(
    store: RecordWriter, feedback: Feedback, app: str, *, first_gap: float, wait: float
) -> RateResult:
    """`store.rate`, looked up again while the answer is unknown, for up to `wait` seconds,
    at gaps doubling from `first_gap` to MAX_RECHECK_GAP. Between lookups it holds nothing:
    each lookup is one job on the writer thread, whose connection only that job uses."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    gap = min(first_gap, MAX_RECHECK_GAP)
    while True:
        result = await store.rate(feedback.request_id, app, feedback.score, feedback.label)
        left = deadline - loop.time()
        if result != "unknown" or left <= 0:
            return result
        await asyncio.sleep(min(gap, left))
        gap = min(2 * gap, MAX_RECHECK_GAP)


def feedback_handler(ref: SnapshotRef, store: RecordWriter, *, recheck_after: float) -> Handler:
    """The handler for FEEDBACK_PATH; `recheck_after` is the store's flush interval."""
    bound = write_bound(recheck_after)
    wait = min(bound, MAX_LOOKUP_WAIT)
    # Past `bound` an id still missing is in no record: 404. A flush interval so long that
    # `wait` ends first leaves it undecided: 503, retry once the bound has passed.
    retry_after = str(math.ceil(bound - wait)).encode() if bound > wait else None

    async def handle(request: Request, response: Response) -> None:
        if request.method != "POST":
            raise method_not_allowed(request.method, request.path, "POST")
        app = authenticate(request, ref.current)
        feedback = parse_feedback(request.body)
        app_name = app.name if app is not None else ""
        try:
            result = await rate_when_recorded(
                store, feedback, app_name, first_gap=recheck_after, wait=wait
            )
        except StoreUnavailable as exc:
            store.metrics.feedback.labels("unavailable").inc()
            raise ApiError(
                503,
                f"feedback cannot be stored now ({exc}); retry later",
                type="server_error",
                code="feedback_unavailable",
                headers=[(b"retry-after", b"1")],
            ) from None
        if result == "unknown" and retry_after is not None:
            store.metrics.feedback.labels("unavailable").inc()
            raise ApiError(
                503,
                f"no record with id '{feedback.request_id}' yet; records are written every "
                f"{recheck_after:g}s, so it may still come: retry later",
                type="server_error",
                code="request_not_recorded_yet",
                headers=[(b"retry-after", retry_after)],
            )
        store.metrics.feedback.labels(result).inc()
        if result == "unknown":
            raise not_found(f"no request with id '{feedback.request_id}'", code="request_not_found")
        if result == "forbidden":
            raise ApiError(
                403,
                "this request was made by another app; only its app may rate it",
                type="permission_error",
                code="not_your_request",
                param="request_id",
            )
        answer: dict[str, Any] = {"object": "feedback", "request_id": feedback.request_id}
        if feedback.score is not None:
            answer["score"] = feedback.score
        else:
            answer["label"] = feedback.label
        response.send(200, JSON_HEADERS, orjson.dumps(answer))

    return handle


__all__ = [
    "FEEDBACK_PATH",
    "LABELS",
    "Feedback",
    "feedback_handler",
    "parse_feedback",
    "rate_when_recorded",
    "write_bound",
]
