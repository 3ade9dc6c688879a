"""The machinery of ``sandbox.py``, one module per concern; standard library only, since it runs
inside the isolated workers too. ``sandbox.py`` is the public entry point (``Sandbox``,
``Result``, ``VERDICTS``, ``task_kind``, the command line) and its docstring the description
and the threat model.

* the parent: ``pool`` (the Sandbox, its result cache, the worker processes), ``jobs`` (tasks
  checked against the schema, cache keys);
* shared: ``wire`` (frames, plain-data pickles), ``fdio`` (descriptor and file I/O),
  ``constants``, ``verdicts`` (the result record, classification);
* a worker: ``worker`` (serves jobs, runs ``check``), ``stdio`` (stdin/stdout runs, the C++
  compile cache), ``rpc_trusted`` (the proxy of the candidate function), ``zygote`` and
  ``processes`` (creating, confining and reaping runs);
* isolation: ``isolation`` (namespaces, the file-system view, rlimits), ``landlock``,
  ``seccomp``, ``kernel`` (libc and system calls);
* a run's untrusted process: ``rpc_untrusted`` (answers the calls).

A worker process loads this package by its file path and calls :func:`import_all` before it
isolates itself: once it has pivoted into its minimal root, no module of the package can be
imported any more.
"""

from __future__ import annotations


def import_all() -> None:
    """Import every module of this package."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
