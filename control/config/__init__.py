"""The config directory, from YAML files to one immutable `Snapshot`.

It owns the file schemas (`schema`, `gateway_schema`, `values`), reading and locating YAML
nodes for file:line errors (`yamltree`, `loader`, `issues`), resolving presets, policies and
the Gateway document into data-plane types (`presets`, `policies`, `gateway`) and the one
pure `build_config` that start-up, reload, `sluice check` and `sluice render` all run
(`build`). The CLI commands that only read config live here too: `sluice check|show`
(`check`), `sluice preset import|export` (`hfconfig`), `sluice key new` (`keys`) and the
generated docs/CONFIG.md (`reference`). Nothing here starts a server or touches the network.
"""
