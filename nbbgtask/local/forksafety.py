"""Whether this process can still start a task by fork, or a runtime in it would hang the copy.

A forked child inherits the process's memory but only the thread that forked: a runtime whose
worker threads were started here waits in the child for threads that do not exist, for ever.
`hazard` names such a runtime, by these rules (each tested in tests/test_forksafety.py):

1. **Imported runtimes that do not survive a fork**: torch, tensorflow, jax and grpc start thread
   pools or background threads at import or first use, and their projects say not to fork after
   using them; importing one is enough here (torch is too large to install on the test machines:
   its rule is tested with a stand-in module of that name).
2. **polars' thread pool**: importing polars is harmless (measured: the child of a fork after the
   import runs a group-by), but once a query ran, its pool's threads (named ``polars-N``) exist
   and a forked child's query hangs.
3. **An OpenMP runtime that may have workers** (GNU libgomp, LLVM libomp, Intel libiomp; found
   through threadpoolctl): after a parallel region ran (an ``HistGradientBoostingClassifier().fit``)
   its worker threads exist and the child's next parallel region hangs.  Its workers have no
   names and no Python ``threading`` object, and neither have OpenBLAS's, which survive a fork
   (numpy's matmul works in the child) but come and go (OpenBLAS stops them at every fork and
   starts them again on its next call), so they cannot be told apart by counting.  So: an OpenMP
   runtime is loaded and the process has any unnamed native thread.  This errs on the safe side:
   scikit-learn loads libgomp at import, and a notebook that imported it without fitting
   anything (where a fork would still work) is sent to the fork server too.

A bare count of native threads is not a rule: numpy's OpenBLAS starts one at import and forks
safely, so it would send every numpy user to the slower fork server.  The verdict is cached and
recomputed only when the set of threads or the number of imported modules changes (a count of
threads is not enough: a thread that ends as a pool's worker starts keeps it), so asking before
every task costs a directory listing (about 10 µs).
"""

from __future__ import annotations

import os
import re
import sys
import threading

__all__ = ["hazard", "KNOWN_RUNTIMES"]

#: modules whose import is enough: what each does that a fork does not survive
KNOWN_RUNTIMES = {
    "torch": "torch's thread pools (and CUDA) do not survive a fork",
    "tensorflow": "TensorFlow's thread pools do not survive a fork",
    "jax": "JAX's runtime threads do not survive a fork",
    "grpc": "gRPC's background threads do not survive a fork",
}
_POLARS_POOL = re.compile(r"polars-\d+\Z")
_OPENMP = ("libgomp", "libomp", "libiomp")

_cached: tuple[tuple[frozenset[str], int], str | None] | None = None
_pools: tuple[int, list[dict[str, object]]] | None = None


def _thread_ids() -> list[str]:
    try:
        return os.listdir("/proc/self/task")
    except OSError:
        return []


def _name(tid: str) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _thread_pools() -> list[dict[str, object]]:
    """threadpoolctl's view of the native thread pools loaded here (re-read when imports change)."""
    global _pools
    if _pools is None or _pools[0] != len(sys.modules):
        try:
            from threadpoolctl import threadpool_info

            info = threadpool_info()
        except Exception:  # threadpoolctl could not look (an unusual libc): no verdict from it
            info = []
        _pools = (len(sys.modules), info)
    return _pools[1]


def _assess(tids: list[str]) -> str | None:
    for module, why in KNOWN_RUNTIMES.items():
        if module in sys.modules:
            return f"{module} is imported: {why}"
    python_threads = {t.native_id for t in threading.enumerate()}
    main_name = _name(str(os.getpid()))
    unnamed = 0
    for tid in tids:
        if int(tid) in python_threads:
            continue
        name = _name(tid)
        if _POLARS_POOL.match(name):
            return "polars has started its thread pool, which does not survive a fork"
        if name == main_name:
            unnamed += 1
    if unnamed:
        openmp = [p for p in _thread_pools() if p.get("user_api") == "openmp"]
        if openmp:
            library = os.path.basename(str(openmp[0].get("filepath", "OpenMP")))
            return f"an OpenMP runtime ({library}) is loaded and native threads run, whose workers do not survive a fork"
    return None


def hazard() -> str | None:
    """Why forking this process now would leave a task hanging, or ``None`` if it is safe."""
    global _cached
    tids = _thread_ids()
    key = (frozenset(tids), len(sys.modules))
    if _cached is not None and _cached[0] == key:
        return _cached[1]
    verdict = _assess(tids)
    _cached = (key, verdict)
    return verdict
