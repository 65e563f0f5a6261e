"""Deterministic generated text: word-piece tokens drawn from a fixed vocabulary.

The same seed and prompt give the same tokens on every run and platform, so tests can
predict a response: `"".join(sample_tokens(seed, prompt_text, index, count))` where
`prompt_text` is `chat_prompt_text(messages)` for chat or the prompt string for
completions, `index` the choice index within its prompt, and `seed` the request's `seed`
or the server's `--seed`.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

# ASCII word pieces in the spirit of a BPE vocabulary (leading-space words, suffixes,
# punctuation, newlines). Changing this list changes every predicted text: append only.
# fmt: off
VOCAB: tuple[str, ...] = (
    " the", " comp", "ro", " u", "lo", " a", " of", " and", " to", " in",
    " is", " it", " that", " for", " on", " with", " as", " was", " be", " by",
    "ing", "ed", "er", "es", "ly", "ion", "al", "ent", "ic", "ous",
    " model", " token", " stream", " proxy", " simple", " better", " than", " complex",
    " flat", " sparse", " read", "ability", " counts", " special", " cases", " rules",
    " practical", "ity", " beats", " purity", " errors", " never", " pass", " silent",
    " explicit", " unless", " face", " ambigu", " refuse", " temptation", " guess",
    " one", " obvious", " way", " now", " often", " hard", " explain", " bad", " idea",
    " easy", " good", " name", "spaces", " honk", " great", " let", " do", " more",
    ",", ".", "!", "?", ":", ";", " -", " (", ")", " \"", "'s", "\n", ".\n", ",\n",
    " 1", " 2", " 3", " 42", " 1000", "0", "7", " x", " y", " z",
    " We", " The", " It", " In", " This", " There", " If", " When", " But", " So",
    " over", " under", " before", " after", " while", " until", " again", " still",
    " quick", " brown", " fox", " jumps", " lazy", " dog", " red", " blue", " green",
    " time", " day", " world", " word", " line", " text", " data", " value", " set",
    "s", "t", "n", "d", "y", "e", "a", "o", "i", "k",
    " sil", "enc", "ambi", "peci", "Nam", " vLLM", " Sluice", " GPU", " cache", " batch",
)
# fmt: on

_CHAT_TOKENS_PER_MESSAGE = 4  # role markers of a ChatML-like template
_CHAT_TOKENS_PRIMING = 3  # the assistant turn the template opens


def derive_seed(seed: int, prompt: str, index: int) -> int:
    """A stable 64-bit seed: unlike hash(), blake2b does not change between runs."""
    digest = hashlib.blake2b(
        f"{seed}\x00{index}\x00{prompt}".encode("utf-8", "surrogatepass"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def sample_tokens(seed: int, prompt: str, index: int, count: int) -> list[str]:
    """The `count` tokens the simulator generates for this prompt and choice index."""
    rng = random.Random(derive_seed(seed, prompt, index))
    return rng.choices(VOCAB, k=count)


def sample_logprobs(seed: int, prompt: str, index: int, count: int) -> list[float]:
    """Plausible (negative, mostly near zero) log-probabilities for the sampled tokens."""
    rng = random.Random(derive_seed(seed, prompt, index) ^ 0x5EED)
    return [-(rng.random() ** 2) * 2.5 - 1e-4 for _ in range(count)]


def alternatives(token: str, logprob: float, count: int) -> list[tuple[str, float]]:
    """The `count` most likely candidates for a position, the sampled token first. They
    depend on the token only, so a stream and a non-stream body agree."""
    ranked = [(token, logprob)]
    key = sum(token.encode("utf-8", "surrogatepass"))
    step = 0
    while len(ranked) < count:
        step += 1
        candidate = VOCAB[(key + step * 13) % len(VOCAB)]
        if any(candidate == seen for seen, _ in ranked):
            continue
        ranked.append((candidate, logprob - 0.5 - 0.75 * step))
    return ranked


def content_text(content: object) -> str:
    """A message's text: a string, or the text parts of an OpenAI content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return ""


def chat_prompt_text(messages: Sequence[object]) -> str:
    """What the simulator hashes for a chat request: `role: text` lines."""
    lines = []
    for message in messages:
        if isinstance(message, dict):
            lines.append(f"{message.get('role', '')}: {content_text(message.get('content'))}")
    return "\n".join(lines)


def count_text_tokens(text: str) -> int:
    """Roughly four bytes a token, like real BPE vocabularies on English text."""
    return max(1, (len(text.encode("utf-8", "surrogatepass")) + 3) // 4)


def count_chat_tokens(messages: Sequence[object]) -> int:
    total = _CHAT_TOKENS_PRIMING
    for message in messages:
        text = content_text(message.get("content")) if isinstance(message, dict) else ""
        total += _CHAT_TOKENS_PER_MESSAGE + (count_text_tokens(text) if text else 0)
    return total
