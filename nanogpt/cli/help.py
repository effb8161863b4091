"""``--help``: the groups a command composes, with their options, and every key's meaning and value.

The options of each group are Hydra's own answer (its config repository over
the whole search path), so files a user adds with ``--config-dir DIR`` or
``hydra.searchpath=[...]`` are listed beside the package's, as tab completion
and error messages list them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanogpt.cli.overrides import flatten, parse_overrides
from nanogpt.cli.paths import CONFIG_DIR
from nanogpt.options import describe_options

# Hydra's flags that take a value (as separate argument or after "=").
VALUE_FLAGS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp")


def command_as_typed(config_name: str) -> str:
    """The command as typed: ``nanogpt-train`` (the installed script), else ``python -m nanogpt.train``."""
    script = Path(sys.argv[0]).stem
    return script if script.startswith("nanogpt-") else f"python -m nanogpt.{config_name}"


def help_text(config_name: str, schema: type, argv: list[str], command: str | None = None) -> str:
    """--help: the groups this entry point composes, with their options, and every key's meaning.

    argv is the command line after the command; values are those it would run
    with (its overrides composed), so ``model=tiny --help`` shows tiny's shape.
    """
    flags, overrides = split_arguments(argv)
    config_name = flags.get("--config-name", config_name)
    overrides = with_config_dir(overrides, flags.get("--config-dir"))
    lines = [f"{command or command_as_typed(config_name)} [group=option ...] [key=value ...]", ""]
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        options = group_options([f.name for f in dataclasses.fields(schema)], overrides)
        if options:
            lines.append("Config groups (choose one option each):")
            lines += [f"  {group}: {', '.join(choices)}" for group, choices in options.items()
                      if group != "experiment"]
            if "experiment" in options:
                lines.append(f"  +experiment: {', '.join(options['experiment'])}")
            lines.append("")
        values = composed_values(config_name, overrides)
    lines.append("Keys (key=value), with the values this command line would use:")
    for key, kind, default, meaning in describe_options(schema):
        value = values.get(key, default)
        lines.append(f"  {key}: {kind} = {'(required)' if value == '???' else repr(value)}")
        if meaning:
            lines.append(f"      {meaning}")
    lines += ["", "Hydra: --cfg job (print the composed config), -m (sweep), --hydra-help, "
              "--config-dir DIR (your own group files and recipes), --shell-completion install=bash"]
    return "\n".join(lines)


def split_arguments(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """({long flag: value} of Hydra's flags that take one, the overrides) of a command line."""
    long_names = {"-cd": "--config-dir", "-cn": "--config-name", "-cp": "--config-path"}
    flags, overrides, pending = {}, [], None
    for arg in argv:
        if pending:
            flags[pending], pending = arg, None
        elif arg.split("=", 1)[0] in VALUE_FLAGS:
            flag, _, value = arg.partition("=")
            flag = long_names.get(flag, flag)
            if value:
                flags[flag] = value
            else:
                pending = flag
        elif not arg.startswith("-"):
            overrides.append(arg)
    return flags, overrides


def with_config_dir(overrides: list[str], config_dir: str | None) -> list[str]:
    """The overrides with --config-dir's folder added to hydra.searchpath, as Hydra adds it to its own."""
    if config_dir is None:
        return overrides
    paths = [f"file://{os.path.abspath(os.path.expanduser(config_dir))}"]
    kept = []
    for override in parse_overrides(overrides):
        if override.key_or_group == "hydra.searchpath":
            paths += [str(p) for p in override.value()]
        else:
            kept.append(override.input_line)
    return [*kept, "hydra.searchpath=[" + ",".join(f"'{p}'" for p in paths) + "]"]


def group_options(names: list[str], overrides: list[str]) -> dict[str, list[str]]:
    """{group: its options} for those of names that are config groups, and the experiment recipes.

    Hydra's repository is asked over the search path the command line gives (its hydra.searchpath).
    """
    loader = GlobalHydra.instance().config_loader()
    searchpath = [o for o in overrides if o.startswith("hydra.searchpath=")]
    for attempt in (searchpath, []):
        try:
            found = {name: sorted(loader.get_group_options(name, overrides=attempt))
                     for name in [*names, "experiment"]}
        except Exception:  # noqa: BLE001 (a search path that does not parse: list the package's own)
            continue
        return {name: choices for name, choices in found.items() if choices}
    return {}


def composed_values(config_name: str, overrides: list[str]) -> dict:
    """{dotted.key: value} of the config with overrides (Hydra initialised); {} if they do not compose."""
    try:
        cfg = hydra.compose(config_name=config_name, overrides=overrides)
    except Exception:  # noqa: BLE001 (help still shows the schema's defaults for a bad command line)
        return {}

    try:
        return flatten(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException:  # an interpolation that cannot resolve yet: show it as written
        return flatten(OmegaConf.to_container(cfg, resolve=False))
