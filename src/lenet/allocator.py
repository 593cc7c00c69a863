"""How lenet's processes keep memory between steps and requests: the C allocator's freed
blocks, and (in the service) the garbage collector's hands off what start-up loaded.

glibc's malloc hands large blocks back to the system when they are freed (unmapped, or trimmed
off the top of a thread's heap), and the next use takes the same memory back page by page.
Its own threshold for that adapts as blocks come and go, so whether a process pays for it
depends on the order of its first allocations: the same training step ran with 0 to 2,800
page faults from one process to the next.

A training step allocates and frees tens of megabytes of activations and gradients (the
tutorial's LeNet at batch 256: 3.5 MB for the first layer's maps alone, again for their
gradient, and the pooling's indices). Keeping freed blocks took such a step from 19-25 to
15-18 ms (`lenet` at batch 256) and from 24-26 to 18-23 ms (`lenet-relu`), measured in
alternated processes; `lenet train` sets it before it allocates anything.

In the service, each request allocates and frees a few megabytes of pixel arrays (a 280x280
canvas is a 313 kB float32 array, and several of them are made): 340 to 580 page faults a request,
measured on `lenet serve` under load (minflt in /proc/PID/stat), costing the server about 2 ms
of CPU a request (8.7 against 6.9 ms, one client). Keeping freed blocks for reuse removes the
faults (0.1 a request) and gave from 2% to 43% more requests a second in alternated runs of 16
clients, the low end within this machine's noise (benchmarks/serve_load.py, section 5; the
README has the figures).

Python's full garbage collections walk every container object alive: after importing
onnxruntime (or PyTorch), NumPy, SciPy and FastAPI and loading a model, about 80,000 of them,
45 to 68 ms a pass, measured in `lenet serve` under load, where one came every 6 to 8 seconds
and held up every request in flight (the slowest 1% of requests came in such bursts of 16).
What start-up loaded lives as long as the process, so it is taken out of the collector's
sight once loaded (gc.freeze): a full pass then takes microseconds to 2 ms.
"""

from __future__ import annotations

import ctypes
import gc
import os

# mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap (and are reused) rather than from their own
# mapping: any array of a picture at the working size (at most 4 x 320^2 pixels) and a
# training batch's activations (LeNet-plus at batch 256: 9 MB for its largest) fit under it;
# a huge upload's full-size decode still gets its own mapping, returned when freed.
MMAP_THRESHOLD = 16 * 1024 * 1024
# Free memory at the top of a heap is returned to the system only beyond this: the working set
# of a few requests in flight stays, and the resident size stays flat (measured over 20,000
# requests by benchmarks/serve_load.py).
TRIM_THRESHOLD = 32 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse; False where it is not glibc (musl,
    macOS, Windows), which is left as it is."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        glibc = None
    if not glibc:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's name on every Linux that has it
    except OSError:
        return False
    # Both are needed: either alone (which also turns off glibc's own adjustment of the
    # other) still left 560 to 860 page faults a request, measured.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def freeze_loaded_objects() -> None:
    """Leave every object alive now (what start-up imported and loaded) out of all later
    garbage collections; call it once a serving process is ready."""
    gc.freeze()
