"""Reading a multipart form's `model` and `stream` fields as vLLM's form parser reads
them (proxy/formparts.py), fed in pieces of any size."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st
from sluice.proxy.formparts import FormScan, form_boundary, part_name

BODY = (
    b"preamble\r\n"
    b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="x; name=model"\r\n'
    b'Content-Type: audio/wav\r\n\r\nRIFF--xy\r\nname="model"\r\n\r\n'
    b"\r\n--xyz\r\ncontent-disposition: form-data; name=model\r\n\r\nchat\r\n"
    b'--xyz\r\nCONTENT-DISPOSITION: form-data; name="stream"; x=y\r\n\r\nTrue\r\n'
    b"--xyz--\r\n"
)


def _fields(scan: FormScan, body: bytes) -> list[tuple[bytes, bytes]]:
    return [(f.name, body[f.start : f.end]) for f in scan.fields]


def test_parts_are_found_by_their_name_parameter_as_starlette_reads_it() -> None:
    """Unquoted and quoted names, any case of the header's name, parameters after the
    name; a filename that mentions `name=model`, or file bytes that look like a header,
    are no field."""
    scan = FormScan(b"xyz")
    scan.feed(BODY)
    assert _fields(scan, BODY) == [(b"model", b"chat"), (b"stream", b"True")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(BODY)), max_size=12))
def test_any_split_of_the_body_finds_the_same_fields(cuts: list[int]) -> None:
    scan = FormScan(b"xyz")
    points = sorted(set(cuts))
    for start, end in zip([0, *points], [*points, len(BODY)], strict=True):
        scan.feed(BODY[start:end])
    assert _fields(scan, BODY) == [(b"model", b"chat"), (b"stream", b"True")]


def test_a_hostile_body_is_scanned_in_linear_time() -> None:
    """Part heads that never end, and delimiters by the thousand: each byte is searched
    once, each head read once and bounded."""
    for body in (
        b"--b\r\n" + b'name="model"\r\n' * 20_000,
        b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\n" * 20_000,
    ):
        scan = FormScan(b"b")
        started = time.perf_counter()
        for at in range(0, len(body), 4096):
            scan.feed(body[at : at + 4096])
        assert time.perf_counter() - started < 1.0
        assert scan.fields == []


def test_the_boundary_and_the_name_parameters() -> None:
    assert form_boundary(b"multipart/form-data; boundary=abc") == b"abc"
    assert form_boundary(b'Multipart/Form-Data; charset=utf-8; BOUNDARY="a b"') == b"a b"
    assert form_boundary(b"multipart/form-data") is None
    assert part_name(b'\r\nContent-Disposition: form-data; name="a\\"b"') == b'a"b'
    assert part_name(b"\r\nContent-Type: text/plain") is None
