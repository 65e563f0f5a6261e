"""The build under test is the one named, and it compiled what setup.py says.

`make test` runs the suite against the sources (pure Python, the fallback) and against the
wheel `pip install .` builds (setup.py: the data-plane modules compiled by mypyc, all but
those that await while an exception may be in flight), naming the build in SLUICE_EXPECT_BUILD: a run that silently imported
the other build fails here."""

from __future__ import annotations

import ast
import importlib
import os
import runpy
from pathlib import Path

import pytest
from sluice.proxy import http1parse, jsonbody, native, observe
from sluice.proxy.build import build_kind

from tests.fixtures import REPO, ProcessServer, sluice_cmd

SETUP = runpy.run_path(str(REPO / "setup.py"), run_name="setup")


def test_the_build_is_the_one_this_run_names() -> None:
    relay = importlib.import_module("sluice.proxy.relay").__file__ or ""
    assert build_kind() == ("pure" if relay.endswith(".py") else "compiled")
    expected = os.environ.get("SLUICE_EXPECT_BUILD")
    if expected:  # make test-pure / make test-compiled
        assert build_kind() == expected, f"the {expected} build was named, {relay} runs"


def test_the_compiled_build_reads_heads_with_its_c_parser() -> None:
    """proxy/_http1.c is built with the compiled build only; the pure one uses httptools."""
    assert http1parse.HEADS_IN_C is (build_kind() == "compiled")


def test_the_compiled_build_writes_access_lines_and_checks_depth_in_c() -> None:
    """proxy/_jsonline.c and proxy/_jsondepth.c are built with the compiled build only;
    the pure one writes its lines with orjson and counts brackets in Python."""
    assert observe.LINES_IN_C is (build_kind() == "compiled")
    assert (jsonbody._exceeds_in_c is not None) is (build_kind() == "compiled")


def test_exactly_the_modules_setup_selects_are_compiled() -> None:
    compiled = {p.stem for p in SETUP["compiled_modules"]()}
    # The per-request path, coroutines included.
    per_request = {"app", "http", "upstream", "upstream_pool", "backends", "relay_stream", "limits"}
    per_request |= {"adapters", "relay", "refusal", "ids"}
    assert per_request | {"chunks", "response", "reader", "routing", "observe"} <= compiled
    # `async with`, or an await in a finally: left to the interpreter (mypyc 2.4's bug).
    assert not compiled & {"upload", "health", "limit_redis"}
    for source in sorted((REPO / "proxy").glob("*.py")):
        module = importlib.import_module(f"sluice.proxy.{source.stem}")
        path = module.__file__ or ""
        is_source = path.endswith(".py")
        if build_kind() == "pure" or source.stem not in compiled:
            assert is_source, f"{source.stem} runs from {path}"
        else:
            assert not is_source, f"{source.stem} should be compiled, runs from {path}"


def test_setup_finds_awaits_while_an_exception_is_in_flight(tmp_path: Path) -> None:
    awaits = SETUP["awaits_with_exception_in_flight"]
    for code, expected in [
        ("def f(x):\n    return x\n", False),
        ("async def f(g):\n    try:\n        await g()\n    except E:\n        pass\n", False),
        ("async def f(g):\n    try:\n        pass\n    finally:\n        await g()\n", True),
        ("async def f(g):\n    try:\n        pass\n    except E:\n        await g()\n", True),
        ("async def f(g):\n    try:\n        pass\n    finally:\n        if g:\n"
         "            async for x in g:\n                pass\n", True),
        ("async def f(t):\n    async with t:\n        pass\n", True),
    ]:  # fmt: skip
        source = tmp_path / "probe.py"
        source.write_text(code)
        assert awaits(source) is expected, code


def test_no_compiled_function_names_two_kinds_of_caught_exception() -> None:
    """mypyc gives a local one type: `except A as exc` then `except B as exc` in one
    function checks the second against A and raises TypeError (a 413 became a 500)."""
    for source in SETUP["compiled_modules"]():
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            caught: dict[str, set[str]] = {}
            for node in ast.walk(function):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type:
                    caught.setdefault(node.name, set()).add(ast.unparse(node.type))
            for name, kinds in caught.items():
                assert len(kinds) == 1, f"{source.name}:{function.lineno} `{name}`: {kinds}"


def test_module_constants_of_compiled_modules_are_final() -> None:
    """mypyc reads a module-level name from the module's dict, with a type check, at each
    use; a `Final` one is a C constant (a literal is inlined). The per-event and
    per-request code reads such constants throughout."""
    for source in SETUP["compiled_modules"]():
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, annotation = node.targets[0], None
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target, annotation = node.target, ast.unparse(node.annotation)
            else:
                continue
            if not isinstance(target, ast.Name) or not target.id.lstrip("_").isupper():
                continue
            if isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "TypeVar":
                continue
            assert annotation is not None and annotation.startswith("Final"), (
                f"{source.name}:{node.lineno} `{target.id}` is not Final"
            )


def test_serve_says_which_build_it_runs() -> None:
    # No backend is reached: the process only has to start.
    argv = sluice_cmd(
        "serve", "--host", "127.0.0.1", "--port", "0", "--backend", "http://127.0.0.1:9"
    )
    server = ProcessServer(argv)
    try:
        line = next(line for line in server.stdout_lines if "serving on" in line)
        assert f" build={build_kind()} " in line
    finally:
        server.stop()


def test_setup_falls_back_to_pure_python_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    why_pure = SETUP["_why_pure"]
    monkeypatch.delenv("SLUICE_COMPILE", raising=False)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert why_pure() == "no C compiler (/nonexistent/cc)"
    monkeypatch.setenv("SLUICE_COMPILE", "0")
    assert why_pure() == "SLUICE_COMPILE=0"
    monkeypatch.delenv("SLUICE_COMPILE")
    monkeypatch.delenv("CC")
    assert why_pure() is None  # this machine has gcc, Python.h and mypyc (the test extra)


def test_an_extension_that_is_not_built_is_none_and_a_broken_one_an_error() -> None:
    """proxy/native.py: a pure build runs the Python versions; a compiled build whose
    extension cannot load fails at start-up rather than quietly running them."""
    assert native.c_function("_not_an_extension", "line") is None
    with pytest.raises(ModuleNotFoundError):
        native.c_function("_not_an_extension.inner", "line")
