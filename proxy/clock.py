"""The clocks the data plane reads, bound once as final names.

mypyc compiles a module-level `Final` to a C static. A call of `monotonic` imported with
`from time import monotonic` looked the name up in the calling module's globals each
time, and `time.time()` read the module's attribute: ~130 instructions a call, one per
token and ~17 per short request (docs/BENCHMARKS.md). Through these names a call reads
a static. Interpreted, they are the same functions.
"""

from __future__ import annotations

import time
from typing import Final

monotonic: Final = time.monotonic
wall: Final = time.time  # seconds since the epoch
