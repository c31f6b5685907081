"""The multiprocessing context that a worker starts its node processes with.

A node process started with the `spawn` method is a new interpreter that
imports the engine, psutil, cloudpickle and a stream module before it loads
its recipe: about 0.1 s of CPU on the 2-core machine of docs/benchmarks.md.
Where the platform has it, the worker uses multiprocessing's `forkserver`
method instead: one server process imports those modules once, and each node
process is a fork of it.

    engine worker                       the worker
    ├── forkserver                      imports PRELOADED_MODULES, then waits
    │   ├── node process worker-1/...   forked for each START-NODE
    │   └── ...
    └── resource tracker                multiprocessing's, as with `spawn`

The forkserver is a new interpreter that receives only its own listening
socket and pipe, and it only imports modules: it runs no pipeline code, and
the modules it imports open no connection and start no thread. So a node
forked from it inherits none of the worker's stream connections, sockets or
locks. The forkserver starts with SIGTERM blocked and never unblocks it, so
that a SIGTERM sent to the whole process group drains the nodes instead of
killing their parent. A node process unblocks SIGTERM first thing.

Limits: a node process is a child of the forkserver, so it learns that the
worker died from the sentinel of `multiprocessing.parent_process`. If the
forkserver itself dies, the kernel sends each node SIGTERM, and the worker
kills the nodes and starts them again as crashed. A node process ends with
`os._exit`, so `atexit` handlers of pipeline code do not run in it; close
resources in the node's `teardown` hook.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
from multiprocessing import forkserver
from multiprocessing.context import BaseContext

logger = logging.getLogger(__name__)

# Imported by the forkserver before it forks the first node. "__main__" is the
# script that started the worker, such as the `engine` console script, which a
# node process would otherwise run again to set up its `__mp_main__`.
PRELOADED_MODULES = ("__main__", "engine.runtime", "engine.pipeline", "nodes")
# The stream module to preload, by the scheme of the stream URL.
STREAM_MODULES = {
    "sqlite": "engine.streams.sqlite",
    "amqp": "engine.streams.rabbitmq",
    "amqps": "engine.streams.rabbitmq",
}


def has_forkserver() -> bool:
    """Return True when this platform can start processes with a forkserver."""
    return "forkserver" in multiprocessing.get_all_start_methods()


def node_context() -> BaseContext:
    """Return the context for node processes: `forkserver`, or else `spawn`."""
    return multiprocessing.get_context("forkserver" if has_forkserver() else "spawn")


def start_forkserver(stream_url: str | None = None) -> None:
    """Start this process's forkserver, which imports while the caller goes on.

    `stream_url` picks the stream module to preload; without it the SQLite
    module is preloaded, and a node on another stream imports its own. Starting
    a forkserver that runs already does nothing, and one that died is started
    again. Does nothing where there is no forkserver.
    """
    if not has_forkserver():
        return
    scheme = (stream_url or "sqlite:").partition(":")[0].lower()
    stream_module = STREAM_MODULES.get(scheme, STREAM_MODULES["sqlite"])
    forkserver.set_forkserver_preload([*PRELOADED_MODULES, stream_module])
    # The signal mask survives the exec of the forkserver. Blocking, unlike
    # ignoring, keeps a SIGTERM sent to this process meanwhile pending for it.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
