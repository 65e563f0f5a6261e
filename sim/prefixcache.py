"""A model of vLLM's automatic prefix caching, for developing replica routing without GPUs.

`sluice sim --prefix-cache BLOCKS --prefill-ms-per-block MS`: the prompt text (what the
simulator hashes: `role: text` lines for chat, the prompt for completions) is cut into
blocks of BLOCK_TOKENS tokens (the simulator counts 4 bytes a token) and each block is keyed
by a hash chained over every block before it and the request's `cache_salt`, as vLLM keys
its KV blocks. An LRU of BLOCKS keys stands for the cache. A request's leading blocks that
are in it are hits; each other block costs MS of prefill. BLOCKS is the whole KV cache:
blocks held by requests in flight leave that much less room for cached prefixes.

Prefill is serialized per simulator, as one GPU's compute is: a request's prefill starts
when the one before it ends, and its first token comes `--ttft-ms` after its own prefill
ends. A replica that keeps missing builds a prefill queue (`vllm:num_requests_waiting`
counts requests whose prefill has not started), which is how re-computing every tenant's
prompt on every replica shows up in TTFT. KV usage (`vllm:kv_cache_usage_perc`) is the
blocks held by requests in flight over BLOCKS.
"""

from __future__ import annotations

import collections
from hashlib import blake2b

BLOCK_TOKENS = 16  # vLLM's default block size
BYTES_PER_TOKEN = 4  # as text.count_text_tokens
BLOCK_BYTES = BLOCK_TOKENS * BYTES_PER_TOKEN


def block_keys(prompt: str, salt: str | None) -> list[bytes]:
    """Chained keys of the prompt's full blocks (a partial last block is not cached)."""
    data = prompt.encode("utf-8", "surrogatepass")
    prev = b"" if salt is None else b"salt\x00" + salt.encode("utf-8", "surrogatepass")
    keys = []
    for start in range(0, len(data) - BLOCK_BYTES + 1, BLOCK_BYTES):
        prev = blake2b(prev + data[start : start + BLOCK_BYTES], digest_size=16).digest()
        keys.append(prev)
    return keys


class Admission:
    """One request's share of the cache: how long its prefill waits and takes, and the
    blocks it holds until it ends."""

    __slots__ = ("delay_s", "held_blocks", "hits", "queries")

    def __init__(self, delay_s: float, held_blocks: int, hits: int, queries: int) -> None:
        self.delay_s = delay_s
        self.held_blocks = held_blocks
        self.hits = hits
        self.queries = queries


class PrefixCache:
    def __init__(self, capacity_blocks: int, prefill_s_per_block: float) -> None:
        self.capacity = capacity_blocks
        self.prefill_s_per_block = prefill_s_per_block
        self._lru: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._busy_until = 0.0
        self._starts: collections.deque[float] = collections.deque()  # prefill start times
        self.held_blocks = 0
        self.reset_counters()

    def reset_counters(self) -> None:
        self.query_tokens = 0  # vllm:prefix_cache_queries (tokens)
        self.hit_tokens = 0  # vllm:prefix_cache_hits (tokens)

    def clear(self) -> None:
        self._lru.clear()
        self.reset_counters()

    def admit(self, prompts: tuple[str, ...], salt: str | None, now: float) -> Admission:
        """Looks the prompts up, caches their blocks, and queues their prefill."""
        lru = self._lru
        hits = queries = uncached = held = 0
        per_prompt = [block_keys(prompt, salt) for prompt in prompts]
        self.held_blocks += sum(len(keys) + 1 for keys in per_prompt)
        # Blocks held by requests in flight are not free to cache others' (vLLM caches in
        # its free blocks). Counting a running request's cached prefix twice makes the
        # cache a little smaller than vLLM's: conservative for prefix-aware routing.
        room = max(0, self.capacity - self.held_blocks)
        for keys in per_prompt:
            matched = 0
            for key in keys:
                if key not in lru:
                    break
                matched += 1
            # Tail blocks first, so the prompt's first blocks are the most recently used
            # (vLLM frees a finished request's blocks tail first).
            for key in reversed(keys):
                if key in lru:
                    lru.move_to_end(key)
                else:
                    lru[key] = None
            while len(lru) > room:
                lru.popitem(last=False)
            hits += matched
            queries += len(keys)
            # The partial last block is always computed: at least one block of prefill.
            uncached += len(keys) - matched + 1
            held += len(keys) + 1
        self.query_tokens += queries * BLOCK_TOKENS
        self.hit_tokens += hits * BLOCK_TOKENS
        start = max(now, self._busy_until)
        self._busy_until = start + uncached * self.prefill_s_per_block
        if start > now:
            self._starts.append(start)
        return Admission(self._busy_until - now, held, hits, queries)

    def release(self, admission: Admission) -> None:
        self.held_blocks -= admission.held_blocks

    def waiting(self, now: float) -> int:
        starts = self._starts
        while starts and starts[0] <= now:
            starts.popleft()
        return len(starts)

    def kv_usage(self) -> float:
        return min(1.0, self.held_blocks / self.capacity) if self.capacity else 0.0


__all__ = ["BLOCK_TOKENS", "Admission", "PrefixCache", "block_keys"]
