"""`sluice.client`: a small typed helper that streams chat completions through sluice with
retries (honouring Retry-After) and transparent resume of cut streams. A reference for app
developers; the proxy never imports it."""

from .chat import AsyncSluiceClient, SluiceClient
from .sse import StreamError

__all__ = ["AsyncSluiceClient", "SluiceClient", "StreamError"]
