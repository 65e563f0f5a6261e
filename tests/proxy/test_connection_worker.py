"""A connection's requests run one after another in one task, its worker (a Task per
request cost ~6,300 instructions on 3.11: registering in asyncio's WeakSet of all tasks
and leaving it by a weakref callback, both interpreted). Tested on a real socket: what a
task per request gave for free must still hold, namely each request starts with no
cancellation pending, and nothing is left running once the connection is gone."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sluice.proxy.http import Request, Response

from tests.fixtures import HandlerServer

ANSWER_END = re.compile(rb"cancelling=\d")


class TaskServer(HandlerServer):
    """Answers each request with facts about the task it runs in; `/swallow` cancels its
    own task and catches the cancellation without withdrawing it (a handler's bug)."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []

        async def handler(request: Request, response: Response) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.tasks.append(task)
            cancelling = task.cancelling()
            if request.path == "/swallow":
                task.cancel()
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    pass
            elif request.path == "/slow":
                await asyncio.sleep(0.05)
            body = b"%s cancelling=%d" % (request.path.encode(), cancelling)
            response.send(200, [(b"content-type", b"text/plain")], body)

        super().__init__(handler)
        self.errors = self.lt.record_errors()


@pytest.fixture
def server() -> Iterator[TaskServer]:
    s = TaskServer()
    yield s
    s.close()


def _get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode()


def _read_answers(sock: socket.socket, count: int, timeout: float = 5.0) -> bytes:
    """Reads until `count` whole answers came (each body ends in `cancelling=<digit>`)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while len(ANSWER_END.findall(data)) < count and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_requests_of_one_connection_run_in_its_one_task(server: TaskServer) -> None:
    with (
        socket.create_connection(("127.0.0.1", server.port)) as a,
        socket.create_connection(("127.0.0.1", server.port)) as b,
    ):
        for path in ("/a1", "/slow", "/a3"):
            a.sendall(_get(path))
            assert path.encode() in _read_answers(a, 1)
        b.sendall(_get("/b1"))
        assert b"/b1" in _read_answers(b, 1)
        # Pipelined: three requests in one write, answered in order by the same task.
        a.sendall(_get("/p1") + _get("/slow") + _get("/p3"))
        answers = _read_answers(a, 3)
        assert answers.index(b"/p1") < answers.index(b"/slow") < answers.index(b"/p3")
    tasks = server.tasks
    assert len(tasks) == 7
    a_tasks = {id(t) for i, t in enumerate(tasks) if i != 3}
    assert len(a_tasks) == 1 and id(tasks[3]) not in a_tasks
    assert server.errors == []


def test_a_cancellation_a_handler_swallowed_is_not_pending_in_the_next_request(
    server: TaskServer,
) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(_get("/swallow"))
        assert b"/swallow cancelling=0" in _read_answers(s, 1)
        s.sendall(_get("/after"))
        # The watchdog tells its own timeout from a disconnect by `uncancel() == 0`: a
        # count left over from the request before would turn a timeout into a reset.
        assert b"/after cancelling=0" in _read_answers(s, 1)
    assert server.tasks[0] is server.tasks[1]


def test_a_connection_closed_while_idle_leaves_no_task_running(server: TaskServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(_get("/one"))
        assert b"/one" in _read_answers(s, 1)
        worker = server.tasks[0]
        assert not worker.done()  # waiting for the connection's next request
    deadline = time.monotonic() + 5.0
    while not worker.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.done() and not worker.cancelled()
    assert server.lt.call(lambda: len(server.server.state.connections)) == 0
    assert server.errors == []


def test_closing_the_server_ends_the_workers_of_idle_connections() -> None:
    s = TaskServer()
    try:
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(_get("/one"))
            assert b"/one" in _read_answers(sock, 1)
            worker = s.tasks[0]
            s.lt.run(s.server.close())
            assert worker.done()
            sock.settimeout(5.0)
            assert sock.recv(100) == b""  # and the connection is closed
    finally:
        s.lt.stop()
