"""The control plane and the CLI: everything that is not the request hot path.

`cli.py` parses the command line and imports the command's module lazily; the packages
below it are the architecture: `config` (the config directory -> a validated `Snapshot`),
`runtime` (`sluice serve`: the process, the reloader, the admin API and the services wired
around the data plane), `console` (the browser console), `edge` (nginx and Cloudflare
Worker renderers), `ab` (A/B records, feedback and the report), `bench` (`sluice bench`)
and `verify` (`sluice verify`). pyproject.toml's import contracts say which may import
which; the data plane (`sluice.proxy`) imports none of them.
"""
