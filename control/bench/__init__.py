"""`sluice bench`: the proxy's hot path measured against nginx in the same run.

It owns the command (`bench`), the child processes it starts and measures (`processes`:
simulator, sluice, nginx, their CPU time) and the load generator (`loadgen`: raw asyncio
HTTP/1.1 streams, TTFT and inter-token samples).
"""
