"""Config directory -> validated, immutable `Snapshot`: the one code path.

Start-up, reload, `sluice check`, `sluice config show`, `sluice preset export` and
`sluice render` all call `load_config` (or `build_config` on bytes already read), so what
`check` accepts is exactly what `serve` runs. Everything that can fail happens here; the
caller's swap of `SnapshotRef.current` cannot fail. On any error nothing is returned:
`ConfigInvalid` carries every issue found, each at file:line:column.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from sluice.proxy.snapshot import (
    DEFAULT_TIMEOUTS,
    Backend,
    Route,
    SamplingPlan,
    Snapshot,
    StreamPolicy,
    StreamTimeouts,
)

from .gateway import GatewayParts, build_gateway
from .gateway_schema import GatewayFile, LimitsSection, ListenSection
from .issues import ConfigInvalid, ConfigIssue
from .loader import ConfigFiles, Document, LoadedDocuments, load_documents, read_config_files
from .policies import build_policy
from .presets import ResolvedPreset, preset_document_issues, resolve_presets
from .schema import PolicyFile, PresetFile
from .values import check_url

__all__ = [
    "BuiltConfig",
    "ConfigInvalid",
    "ConfigIssue",
    "build_config",
    "config_version",
    "load_config",
    "passthrough_config",
]

FALLBACK_BACKEND = "default"
VERSION_CHARS = 12


@dataclass(frozen=True, slots=True)
class BuiltConfig:
    """A validated config: the snapshot the proxy runs, and the file models behind it."""

    snapshot: Snapshot
    gateway: GatewayFile | None  # None: no Gateway document (pass-through or presets only)
    presets: Mapping[str, ResolvedPreset]
    policies: Mapping[str, PolicyFile]
    warnings: tuple[ConfigIssue, ...] = ()
    files: tuple[str, ...] = ()  # the files read, as displayed in issues

    @property
    def version(self) -> str:
        return self.snapshot.version


def config_version(files: ConfigFiles, backend_override: str | None = None) -> str:
    """sha256 over the sorted file names and bytes (and --backend): equal input, equal id."""
    digest = hashlib.sha256()
    for source in files.files:  # sorted by name when read
        name = source.name.encode()
        digest.update(len(name).to_bytes(4, "big") + name)
        digest.update(len(source.data).to_bytes(8, "big") + source.data)
    if backend_override is not None:
        digest.update(b"--backend\0" + backend_override.encode())
    return digest.hexdigest()[:VERSION_CHARS]


def load_config(directory: Path, *, backend_override: str | None = None) -> BuiltConfig:
    """Read and build `directory`; raises ConfigInvalid with every issue found."""
    return build_config(read_config_files(Path(directory)), backend_override=backend_override)


def _check_override(url: str) -> str:
    try:
        return check_url(url)
    except ValueError as exc:
        raise ConfigInvalid([ConfigIssue("--backend", None, None, "", str(exc))]) from None


def _fallback_route(url: str) -> tuple[Backend, Route]:
    backend = Backend(name=FALLBACK_BACKEND, urls=(url,))
    # upstream_model None: every model name goes to the backend unchanged.
    return backend, Route(model="*", backend=backend, upstream_model=None)


def passthrough_config(backend_url: str, *, forward_unknown_paths: bool = True) -> BuiltConfig:
    """`sluice serve --backend URL` without a config: one backend, no auth, no presets;
    paths sluice does not know are relayed unless `--no-unknown-paths`."""
    url = _check_override(backend_url)
    backend, route = _fallback_route(url)
    version = hashlib.sha256(b"--backend\0" + url.encode()).hexdigest()[:VERSION_CHARS]
    snapshot = Snapshot(
        version=version,
        routes=MappingProxyType({}),
        backends=MappingProxyType({backend.name: backend}),
        fallback_route=route,
        forward_unknown_paths=forward_unknown_paths,
        source=f"--backend {url}",
    )
    return BuiltConfig(snapshot, None, MappingProxyType({}), MappingProxyType({}))


def _unique(loaded: LoadedDocuments, kind: str, issues: list[ConfigIssue]) -> dict[str, Document]:
    """name -> document for one kind; a second definition is an error naming the first."""
    found: dict[str, Document] = {}
    for doc in loaded.documents:
        if doc.model.kind != kind:
            continue
        name = getattr(doc.model, "name", "")
        if name in found:
            first = found[name].where(("name",))
            issues.append(
                doc.issue(
                    ("name",), f"duplicate {kind.lower()} {name!r} (first defined at {first})"
                )
            )
        else:
            found[name] = doc
    return found


def _gateway_document(loaded: LoadedDocuments, issues: list[ConfigIssue]) -> Document | None:
    gateways = [doc for doc in loaded.documents if isinstance(doc.model, GatewayFile)]
    for extra in gateways[1:]:
        issues.append(
            extra.issue(("kind",), f"a second Gateway document (first at {gateways[0].where()})")
        )
    return gateways[0] if gateways else None


def _build_presets(loaded: LoadedDocuments, issues: list[ConfigIssue]) -> dict[str, ResolvedPreset]:
    docs = _unique(loaded, "Preset", issues)
    models: dict[str, PresetFile] = {}
    for name, doc in docs.items():
        assert isinstance(doc.model, PresetFile)
        problems = preset_document_issues(doc.model)
        issues += [doc.issue(path, message) for path, message in problems]
        if not problems:
            models[name] = doc.model
    broken = loaded.broken["Preset"]
    broken.update(set(docs) - set(models))
    resolved, preset_problems = resolve_presets(models, broken)
    issues += [docs[p.preset].issue(p.path, p.message) for p in preset_problems]
    broken.update(set(models) - set(resolved))  # references to them are not errors again
    return resolved


def timeout_defaults(gateway: GatewayFile | None) -> StreamTimeouts:
    """The Gateway's `timeouts` (every route's deadlines unless its Policy sets them)."""
    if gateway is None:
        return DEFAULT_TIMEOUTS
    t = gateway.timeouts
    try:
        return StreamTimeouts(t.first_token, t.inter_token, t.total, t.response_head)
    except ValueError:
        return DEFAULT_TIMEOUTS  # gateway_issues reports it with its path


def _build_policies(
    loaded: LoadedDocuments, issues: list[ConfigIssue], defaults: StreamTimeouts
) -> tuple[dict[str, StreamPolicy], dict[str, PolicyFile]]:
    policies: dict[str, StreamPolicy] = {}
    models: dict[str, PolicyFile] = {}
    for name, doc in _unique(loaded, "Policy", issues).items():
        assert isinstance(doc.model, PolicyFile)
        policy, problems = build_policy(doc, defaults)
        issues += problems
        if policy is None:
            loaded.broken["Policy"].add(name)
        else:
            policies[name], models[name] = policy, doc.model
    return policies, models


def build_config(
    files: ConfigFiles,
    *,
    backend_override: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> BuiltConfig:
    """Validate and build from bytes already read (the reloader reads once, then builds)."""
    override = _check_override(backend_override) if backend_override is not None else None
    loaded = load_documents(files)
    issues = list(loaded.issues)
    warnings = [
        ConfigIssue(name, None, None, "", "ignored: only *.yaml files are read", "warning")
        for name in files.ignored
    ]
    resolved = _build_presets(loaded, issues)
    plans: dict[str, SamplingPlan] = {name: r.plan for name, r in resolved.items()}
    gateway_doc = _gateway_document(loaded, issues)
    gateway = gateway_doc.model if gateway_doc is not None else None
    assert gateway is None or isinstance(gateway, GatewayFile)
    defaults = timeout_defaults(gateway)
    policies, policy_models = _build_policies(loaded, issues, defaults)

    parts = GatewayParts()
    fallback: Route | None = None
    if gateway_doc is not None:
        parts, errors, gateway_warnings = build_gateway(
            gateway_doc,
            plans,
            policies,
            loaded.broken,
            backend_override=override,
            environ=os.environ if environ is None else environ,
            timeouts=defaults,
        )
        issues += errors
        warnings += gateway_warnings
    elif override is not None:
        backend, fallback = _fallback_route(override)
        parts.backends[backend.name] = backend
    elif not loaded.broken["Gateway"]:
        message = "no Gateway document: nothing is routed unless sluice serve gets --backend URL"
        warnings.append(ConfigIssue(files.display, None, None, "", message, "warning"))
    if issues:
        raise ConfigInvalid(issues, warnings)

    listen = gateway.listen if gateway is not None else ListenSection()
    limits = gateway.limits if gateway is not None else LimitsSection()
    snapshot = Snapshot(
        version=config_version(files, override),
        routes=MappingProxyType(parts.routes),
        backends=MappingProxyType(parts.backends),
        presets=MappingProxyType(plans),
        policies=MappingProxyType(policies),
        apps=tuple(parts.apps),
        apps_by_key=MappingProxyType(parts.apps_by_key),
        experiments=MappingProxyType(parts.experiments),
        fallback_route=fallback,
        listen_host=listen.host,
        listen_port=listen.port,
        admin_token_hash=parts.admin_token_hash,
        origin_secret_hash=parts.origin_secret_hash,
        max_body_bytes=limits.max_body_bytes,
        max_upload_bytes=limits.max_upload_bytes,
        forward_unknown_paths=limits.forward_unknown_paths,
        source=str(files.directory),
        app_field_rules=MappingProxyType(parts.app_field_rules),
        cache_isolation=gateway is None or gateway.cache_isolation.mode == "per_app",
        cache_salt_key=parts.cache_salt_key,
    )
    return BuiltConfig(
        snapshot=snapshot,
        gateway=gateway,
        presets=MappingProxyType(resolved),
        policies=MappingProxyType(policy_models),
        warnings=tuple(sorted(warnings, key=lambda w: w.sort_key)),
        files=tuple(source.display for source in files.files),
    )
