"""A/B experiments after the response: records, feedback and the report.

It owns the per-request records store (`records`: a batched SQLite writer fed by the
proxy's completion hook, off the hot path), the `POST /v1/feedback` handler plugged into
the proxy's extra routes (`feedback`), `sluice ab report` (`report`) and its statistics
(`stats`). The data plane never imports this package; `sluice.control.runtime.plugins`
wires it in.
"""
