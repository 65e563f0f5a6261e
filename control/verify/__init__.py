"""`sluice verify`: probe a live OpenAI-compatible backend (vLLM) and say whether sluice can
serve it correctly: answers through an in-process sluice equal to direct, the wire shapes the
chunk filter relies on, every preset field accepted, stop strings, aborts on disconnect, the
backend's idle keep-alive timeout, and sluice's added latency and CPU. A bounded number of
small requests; exit 0 when every check passes."""
