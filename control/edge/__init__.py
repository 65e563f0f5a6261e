"""Edge configs rendered from the same Gateway document the proxy runs on.

It owns `sluice render nginx|cloudflare` (`render`), the two renderers (`nginx`,
`cloudflare`), the jinja2 environment that loads the packaged templates (`templates`) and
the timeout arithmetic that keeps every edge timeout longer than the proxy's (`timing`).
"""
