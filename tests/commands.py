"""Run a command as ``python -m nanogpt.<command> ARGS`` would, inside the test process.

A fresh interpreter spends seconds importing torch and Hydra before a command reads
its first argument; a table of bad inputs pays that once per row. Here the command's
own main() runs as that interpreter would run it: sys.argv set (argv[0] the module's
file, as ``python -m`` sets it), the case's directory current and first on sys.path,
the environment the subprocess would get, warnings shown on stderr as a fresh
interpreter shows them, stdout and stderr captured, and the exit status taken from
SystemExit (an uncaught exception prints its traceback and gives 1, as Python does).
What the command changes in the process (directory, environment, logging, Hydra's
global state, torch's threads) is put back afterwards.

Packages can be hidden for the run (tests/without_packages/hiding.py), with Hydra's
record of the plugins it found scanned again under the hiding, as in a process that
never had them. The tables keep one real subprocess per entry point (conftest.run_module).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from omegaconf import OmegaConf

from .without_packages.hiding import hide, hider


def run_in_process(module: str, *args: str, cwd: Path, env: dict | None = None,
                   hidden: Iterable[str] = (), input: str = "") -> subprocess.CompletedProcess:
    """``python -m module args`` in cwd, run in this process; the same fields as subprocess.run's.

    Its standard input is input (piped, so not a terminal), as subprocess.run(input=...) gives it.
    """
    main = importlib.import_module(module).main
    stdout, stderr = io.StringIO(), io.StringIO()
    forget_what_the_package_cached()
    with as_a_fresh_process(module, args, cwd, env), packages_hidden(hidden), stdin_of(input), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings_as_printed():
        try:
            main()
            status = 0
        except SystemExit as done:
            status = done.code if isinstance(done.code, int) else done.code is not None
            if isinstance(done.code, str):
                print(done.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            status = 1
    forget_what_the_package_cached()  # what it learnt with packages hidden is not so
    return subprocess.CompletedProcess([sys.executable, "-m", module, *args], int(status),
                                       stdout.getvalue(), stderr.getvalue())


@contextlib.contextmanager
def stdin_of(text: str) -> Iterator[None]:
    """sys.stdin reading text, as a pipe would give it (pytest's own stdin refuses to be read)."""
    saved, sys.stdin = sys.stdin, io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = saved


def forget_what_the_package_cached() -> None:
    """Empty the package's functools caches, as a fresh process starts (e.g. the tiktoken encodings found)."""
    for name, loaded in list(sys.modules.items()):
        if name == "nanogpt" or name.startswith("nanogpt."):
            for value in list(vars(loaded).values()):
                if callable(getattr(value, "cache_clear", None)) and getattr(value, "__module__", "") == name:
                    value.cache_clear()


@contextlib.contextmanager
def as_a_fresh_process(module: str, args: Iterable[str], cwd: Path, env: dict | None) -> Iterator[None]:
    """The arguments, directory and environment of the subprocess; the process's state put back after."""
    saved_argv, saved_path, saved_cwd = sys.argv[:], sys.path[:], os.getcwd()
    saved_environ = dict(os.environ)
    saved_logging = logging_state()
    saved_hydra_config, threads = HydraConfig.instance().cfg, torch.get_num_threads()
    sys.argv = [importlib.import_module(module).__file__, *args]
    sys.path.insert(0, str(cwd))
    os.environ.pop("HYDRA_FULL_ERROR", None)  # the user's debugging switch, not the tests'
    os.environ.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline", **(env or {})})
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_environ)
        restore_logging(saved_logging)
        if GlobalHydra.instance().is_initialized():
            GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = saved_hydra_config
        torch.set_num_threads(threads)


def all_loggers() -> dict[str, logging.Logger]:
    loggers = {name: logger for name, logger in logging.Logger.manager.loggerDict.items()
               if isinstance(logger, logging.Logger)}
    return {**loggers, "": logging.root}


def logging_state() -> dict:
    """Every logger's level, handlers, propagation and whether it is disabled, and logging.disable's level."""
    return {"disable": logging.root.manager.disable,
            "loggers": {name: (logger.level, logger.handlers[:], logger.propagate, logger.disabled)
                        for name, logger in all_loggers().items()}}


def restore_logging(saved: dict) -> None:
    """Logging as logging_state() found it; loggers made since as new, their handlers closed.

    A command configures logging for its run (Hydra's job logging, a run's log file); left
    so, the records of tests that run later in this process would go there instead of pytest.
    """
    logging.disable(saved["disable"])
    for name, logger in all_loggers().items():
        level, handlers, propagate, disabled = saved["loggers"].get(name, (logging.NOTSET, [], True, False))
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.setLevel(level)
        logger.handlers[:], logger.propagate, logger.disabled = handlers, propagate, disabled


@contextlib.contextmanager
def warnings_as_printed() -> Iterator[None]:
    """Warnings printed to stderr, each once per place, as a fresh interpreter's defaults do.

    pytest records warnings instead of printing them; a warning the command prints
    is part of its output, which the tests read line by line.
    """
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        yield


@contextlib.contextmanager
def packages_hidden(names: Iterable[str]) -> Iterator[None]:
    """The named packages hidden (hiding.py), and Hydra's plugins as a process without them finds them.

    Hydra scans for plugins once per process and keeps the launchers' and sweepers' config
    nodes in its ConfigStore; both are set aside, the scan runs again under the hiding, and
    the nodes that a hidden plugin's own modules defined are left out until the run ends.
    """
    names = tuple(names)
    if not names:
        yield
        return
    hidden = hider(names)
    store = ConfigStore.instance()
    saved_repo, saved_plugins = store.repo, Singleton._instances.pop(Plugins, None)
    store.repo = without_nodes_of(saved_repo, hidden)
    undo = hide(names)
    try:
        yield
    finally:
        undo()
        store.repo = saved_repo
        Singleton._instances.pop(Plugins, None)
        if saved_plugins is not None:
            Singleton._instances[Plugins] = saved_plugins


def without_nodes_of(repo: dict, hidden) -> dict:
    """A copy of a ConfigStore repository without the nodes whose schema a hidden module defines."""
    kept = {}
    for key, value in repo.items():
        if isinstance(value, dict):
            kept[key] = without_nodes_of(value, hidden)
        elif not hidden(getattr(OmegaConf.get_type(value.node), "__module__", "") or ""):
            kept[key] = value
    return kept
