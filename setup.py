"""The data plane (`sluice.proxy`) compiled with mypyc when this machine can build it.

`pip install .` builds a wheel whose `sluice.proxy` modules are C extensions when a C
compiler, Python's headers and mypyc are at hand (the build requires mypy, which brings
mypyc); every module's source ships beside its extension, and Python imports an
extension before a source file.

Every module is compiled except those whose coroutines await while an exception may be
in flight: an `await` inside an `except` or `finally` block, or an `async with` (its exit
is awaited in a `finally`). mypyc 2.4's coroutines keep an exception they caught as the
thread's current one, and such an await raised it again later: running the suite against
an all-compiled build found it (a timeout inside `async with asyncio.timeout` answered 500
instead of 504, a streamed upload over its limit 500 instead of 413). Those modules
(health probes, Redis and PostgreSQL clients, uploads, ...) are off the per-request path;
the handler, the HTTP server, the upstream connection and the relay are compiled. The
same suite runs against both builds (tests/test_compiled_build.py checks which).

Without a compiler, or with SLUICE_COMPILE=0, the wheel is pure Python and runs the same
code, only slower per request (docs/BENCHMARKS.md, "The compiled data plane"). `sluice
serve` says which build it runs on its first line (`build=compiled` or `build=pure`).

The compiled build also has `sluice.proxy._http1` (proxy/_http1.c): llhttp, vendored in
vendor/llhttp as httptools 0.9.0 bundles it, driven by C callbacks that collect a head's
headers, where httptools calls Python once per header (proxy/http1parse.py), and
`sluice.proxy._jsonline` (proxy/_jsonline.c), which writes the access line from its fields
where the pure build builds a dict for orjson (proxy/observe.py), and
`sluice.proxy._jsondepth` (proxy/_jsondepth.c), a request body's nesting depth
(proxy/jsonbody.py), `sluice.proxy._headjoin` (proxy/_headjoin.c), response and
upstream request heads joined (proxy/headjoin.py), and `sluice.proxy._chunkscan`
(proxy/_chunkscan.c), vLLM's common stream chunks read whole by the relay
(proxy/chunkscan.py).

mypyc names a module after its path, so the sources are copied to
build/mypyc-src/sluice/proxy/ first (the repository keeps them in proxy/). It analyses
them without the runtime dependencies, which a build environment does not hold: their
values are `Any` to it, so the compiled code checks no third-party type at run time.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "proxy"
STAGE = Path("build") / "mypyc-src"  # relative: mypyc names modules from these paths
MYPY_CONFIG = """[mypy]
python_version = 3.11
ignore_missing_imports = True
follow_imports = silent
warn_unused_ignores = False
"""


def _why_pure() -> str | None:
    """None when the compiled build can be attempted, else the reason it is not."""
    if os.environ.get("SLUICE_COMPILE", "1") == "0":
        return "SLUICE_COMPILE=0"
    if {"editable_wheel", "develop"} & set(sys.argv):
        return "an editable install runs the sources, which a compiled module would shadow"
    if sys.implementation.name != "cpython":
        return f"mypyc needs CPython, not {sys.implementation.name}"
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return "no Python.h (install python3-dev)"
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed (pip install mypy)"
    return None


def awaits_with_exception_in_flight(source: Path) -> bool:
    """Whether a module awaits inside an `except` or `finally` block or has an `async
    with` (whose exit is awaited in a `finally`): what mypyc 2.4 compiles wrongly."""
    tree = ast.parse(source.read_text(encoding="utf-8"), str(source))
    awaiting = (ast.Await, ast.AsyncWith, ast.AsyncFor)
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncWith):
            return True
        if isinstance(node, ast.Try | ast.TryStar):
            blocks = [*(h.body for h in node.handlers), node.finalbody]
            for block in blocks:
                for statement in block:
                    if any(isinstance(inner, awaiting) for inner in ast.walk(statement)):
                        return True
    return False


def compiled_modules() -> list[Path]:
    """The data-plane sources mypyc compiles: all but those it would compile wrongly."""
    return [p for p in sorted(SOURCE.glob("*.py")) if not awaits_with_exception_in_flight(p)]


def _stage() -> list[str]:
    """The data plane's sources under build/mypyc-src/sluice/proxy/, fresh (all of them:
    mypyc reads the uncompiled ones for their types); the paths of those to compile."""
    target = ROOT / STAGE / "sluice" / "proxy"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for source in sorted(SOURCE.glob("*.py")):  # the C extensions: looked up by name
        shutil.copy2(source, target / source.name)
    (ROOT / STAGE / "mypyc.ini").write_text(MYPY_CONFIG)
    return [str(STAGE / "sluice" / "proxy" / p.name) for p in compiled_modules()]


def http1_extension() -> Extension:
    """The C parser of message heads (relative paths: setuptools wants them so)."""
    return Extension(
        "sluice.proxy._http1",
        sources=[
            "proxy/_http1.c",
            "vendor/llhttp/src/llhttp.c",
            "vendor/llhttp/src/api.c",
            "vendor/llhttp/src/http.c",
        ],
        include_dirs=["vendor/llhttp/include"],
    )


def small_extensions() -> list[Extension]:
    """The access line written in C; a request body's nesting depth checked in C; HTTP/1.1
    heads joined in C; vLLM's common stream chunks read in C."""
    return [
        Extension("sluice.proxy._jsonline", sources=["proxy/_jsonline.c"]),
        Extension("sluice.proxy._jsondepth", sources=["proxy/_jsondepth.c"]),
        Extension("sluice.proxy._headjoin", sources=["proxy/_headjoin.c"]),
        Extension("sluice.proxy._chunkscan", sources=["proxy/_chunkscan.c"]),
    ]


def ext_modules() -> list[object]:
    why = _why_pure()
    if why is not None:
        print(f"sluice: building pure Python ({why})", file=sys.stderr)
        return []
    from mypyc.build import mypycify  # noqa: PLC0415 (only a compiled build needs it)

    paths = _stage()
    os.environ["MYPYPATH"] = str(STAGE)
    print(f"sluice: compiling {len(paths)} data-plane modules with mypyc", file=sys.stderr)
    compiled = mypycify(
        ["--config-file", str(STAGE / "mypyc.ini"), "--explicit-package-bases", *paths],
        opt_level="3",
        group_name="sluice_proxy",
        target_dir=str(Path("build") / "mypyc"),
    )
    return [*compiled, http1_extension(), *small_extensions()]


if __name__ == "__main__":
    setup(ext_modules=ext_modules())
