"""`sluice bench`: the proxy's hot path measured against nginx in the same run.

It owns the command (`bench`), the child processes it starts and measures (`processes`:
simulator, sluice, nginx, their CPU time), the load generator (`loadgen`: raw asyncio
HTTP/1.1 streams, TTFT and inter-token samples) and the simulator's own cost (`simcost`,
`python -m sluice.control.bench.simcost`; it replaces `python -m sluice.sim.selfbench`).
"""
