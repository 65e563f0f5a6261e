"""The long-running processes: `sluice serve` and `sluice sim`.

It owns the server process itself (`serve`: start, signals, drain), the `--workers N`
supervisor (`supervisor`), the file watcher that swaps snapshots (`reloader`), the admin
API (`admin`), structured logging (`logs`), the services plugged into the proxy's
completion hook and extra routes (`plugins`: A/B records and feedback, health probes;
`console`: the browser console), `sluice status` (`status`) and the simulator as a
process (`simulator`). It builds config only through `sluice.control.config`.
"""
