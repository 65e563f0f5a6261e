"""`sluice serve` as a running process: everything that lives as long as the server.

It owns the process itself (`serve`: start, signals, drain), the `--workers N` supervisor
(`supervisor`), the file watcher that swaps snapshots (`reloader`), the admin API (`admin`),
structured logging (`logs`), the services plugged into the proxy's completion hook and
extra routes (`plugins`: A/B records and feedback, health probes) and `sluice status`
(`status`). It builds config only through `sluice.control.config`.
"""
