"""Where a command meets Hydra: composing its config, --help, and turning it into plain dataclasses.

Every entry point (train, sample, chat, data, bench, eval, export) is a function
of a DictConfig wrapped by hydra_entry(), which composes conf/<command>.yaml over
the command's schema, answers --help, reports user errors in one line
(errors.py) and claims or cleans up the run directory (hydra_run_dir.py); the
task then calls to_dataclass() and hands plain dataclasses to plain code.
A refused start leaves nothing behind: the optional packages a config needs are
checked as it is turned into its dataclass.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import gc
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from nanogpt.cli.errors import reporting_user_errors, stopping_with_one_line
from nanogpt.cli.help import command_as_typed, help_text
from nanogpt.cli.hydra_run_dir import (
    new_run_dir,
    release_run_dir,
    remove_refused_sweeps,
    removed_if_refused,
    restored_if_refused,
)
from nanogpt.cli.paths import CONFIG_DIR, EXPERIMENTS_DIR
from nanogpt.cli.sweeps import register_resolvers
from nanogpt.dataset.config import DatasetConfig
from nanogpt.errors import ConfigError, check_packages

T = TypeVar("T")


def register_configs(config_name: str, schema: type) -> None:
    """Register a command's schema (as <config_name>_schema) and the experiment recipes with Hydra.

    conf/<config_name>.yaml starts from its schema. Recipes live in the top-level
    experiments/ folder rather than conf/, so they are registered here as the
    ``experiment`` group; ``+experiment=NAME`` then works from any directory and
    from an installed wheel.
    """
    register_resolvers()
    store = ConfigStore.instance()
    store.store(name=f"{config_name}_schema", node=schema)
    for recipe in sorted(EXPERIMENTS_DIR.glob("*.yaml")):
        store.store(group="experiment", name=recipe.stem, node=OmegaConf.load(recipe), package="_global_")


@functools.cache
def skip_collection_at_exit() -> None:
    """Make this process exit without Python's last garbage collection.

    At exit the collector walks every object left, and after importing torch (and
    torch._dynamo, as building any optimizer does) that takes 0.5-0.8 s: longer
    than many commands' own work. Frozen objects are skipped, and the operating
    system frees the memory anyway. Registered at exit, not done now, so a
    notebook or test that calls an entry point keeps collecting as usual.
    """
    atexit.register(gc.freeze)


def hydra_entry(
    config_name: str, schema: type,
    rewrite_arguments: Callable[[list[str]], list[str]] | None = None,
) -> Callable[[Callable[[DictConfig], object]], Callable[[], None]]:
    """Decorate task(cfg) into a main() that composes conf/<config_name>.yaml over schema.

    rewrite_arguments, if given, may rewrite the command line before Hydra parses
    it (train uses it to continue a run in its own directory: resume=RUN_DIR).
    """

    def decorate(task: Callable[[DictConfig], object]) -> Callable[[], None]:
        debugging = False  # set by main() from the user's HYDRA_FULL_ERROR

        @functools.wraps(task)
        def reported_task(cfg: DictConfig) -> object:
            """The task, user errors reported before Hydra adds its own lines; its run directory let go."""
            skip_collection_at_exit()  # also in a sweep's worker processes, which do not run main()
            try:
                with reporting_user_errors(debugging, in_task=True), removed_if_refused(*new_run_dir()), \
                        restored_if_refused():
                    return task(cfg)
            finally:
                release_run_dir()

        hydra_main = hydra.main(
            version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name
        )(reported_task)

        @functools.wraps(task)
        def main() -> None:
            """Compose the config and run the task; user errors exit with one line."""
            nonlocal debugging
            skip_collection_at_exit()
            register_configs(config_name, schema)
            if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
                print(help_text(config_name, schema, sys.argv[1:], command_as_typed(config_name)))
                return
            debugging = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("NANOGPT_DEBUG") == "1"
            # Let composition errors reach us rather than Hydra's multi-line report.
            previous = os.environ.get("HYDRA_FULL_ERROR")
            os.environ["HYDRA_FULL_ERROR"] = "1"
            try:
                with stopping_with_one_line(config_name), reporting_user_errors(debugging):
                    check_hydra_flags(sys.argv[1:])
                    check_unchosen_groups(config_name, sys.argv[1:])
                    if rewrite_arguments is not None:
                        sys.argv[1:] = rewrite_arguments(sys.argv[1:])
                    hydra_main()
            finally:
                remove_refused_sweeps()
                if previous is None:
                    os.environ.pop("HYDRA_FULL_ERROR", None)
                else:
                    os.environ["HYDRA_FULL_ERROR"] = previous

        return main

    return decorate


def check_unchosen_groups(config_name: str, argv: list[str]) -> None:
    """Refuse, in one line, a key of a group that is null by default and not chosen (Hydra asserts).

    e.g. nanogpt.eval's dataset is the checkpoint's own unless dataset=NAME is given,
    so dataset.name=x alone has nothing to set.
    """
    defaults = OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml").get("defaults", [])
    unchosen = [next(iter(entry)) for entry in defaults
                if isinstance(entry, DictConfig) and list(entry.values()) == [None]]
    keys = [arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg and not arg.startswith("-")]
    for group in unchosen:
        if group in keys:
            continue
        for key in keys:
            if key.startswith(f"{group}."):
                options = ", ".join(sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")))
                raise ConfigError(f"{key}: no {group} is chosen (by default {config_name} takes none), so "
                                  f"it has no keys to set; choose one first: {group}=NAME {key}=... (NAME "
                                  f"one of {options})")


def check_hydra_flags(argv: list[str]) -> None:
    """Refuse, in one line, flag combinations that Hydra rejects with a traceback (a ValueError)."""
    modes = [a for a in argv if a in ("-m", "--multirun", "-c", "--cfg", "--info", "-i", "--run", "-r")]
    if len({m.lstrip("-")[0] for m in modes}) > 1:
        raise ConfigError(
            f"{' and '.join(modes)} cannot be combined (Hydra takes one of -m, --cfg, --info); to see the "
            "config of one job of a sweep, drop -m and give one value per key, e.g. optimizer.lr=1e-3"
        )


def to_dataclass(cfg: DictConfig, schema: type[T]) -> T:
    """The composed config as an instance of its schema dataclass, validated.

    Merging onto the schema rejects keys the schema does not have, at any depth,
    including ones added with ``+key=value``. Each section's own checks run as it
    is built; their messages then get the section's name (model.n_head=...).
    Last, the optional packages its options need are checked (errors.check_packages),
    so every command learns of a missing one before it does any work.
    """
    plain = OmegaConf.create(OmegaConf.to_container(cfg))  # drop the type Hydra gave it
    merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
    values = {}
    for f in dataclasses.fields(schema):
        node = merged[f.name]
        if not isinstance(node, (DictConfig, ListConfig)):
            values[f.name] = node
            continue
        try:
            values[f.name] = OmegaConf.to_object(node)
        except ConfigError as error:
            raise ConfigError(f"{f.name}.{error}") from None
    config = schema(**values)
    check_packages(config)
    return config


def recorded_config(cfg: DictConfig, config: object) -> dict:
    """The composed config as a run records it: resolved, with its datasets as their dataclass made them.

    DatasetConfig turns a local source into an absolute path and derives the
    cache's name from it, so what a checkpoint records still finds the data from
    any directory.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, DatasetConfig):
            resolved[f.name] = dataclasses.asdict(value)
    return resolved
