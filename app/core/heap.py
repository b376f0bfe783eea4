"""The garbage collector set for a long-running server once its start-up is done.

Measured under load (/v1 at c=50, one worker, docs/PERFORMANCE.md): with CPython's defaults the
cyclic collector took about a tenth of the CPU, most of it walking the ~130,000 objects that
start-up leaves behind (modules, schemas, the parts) again and again, and its full collections
were the p99's tail. Frozen, those objects are no longer walked (they are still freed by
reference counting); a larger first-generation threshold makes the collections of what each
request leaves fewer, not longer in sum. Only the serve command does this: it owns its process,
where a test run builds many apps in one.
"""

from __future__ import annotations

import gc

# allocations between young-generation collections (CPython's default: 700); measured 700, 7,000
# and 50,000: 7,000 gave the CPU back, 50,000 no more CPU and a longer p99
YOUNG_THRESHOLD = 7_000


def settle_startup_heap() -> None:
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
