"""``--help``: the groups a command composes, with their options, and every key's meaning and value."""

from __future__ import annotations

import dataclasses

import hydra
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nanogpt.cli.overrides import flatten
from nanogpt.cli.paths import CONFIG_DIR, EXPERIMENTS_DIR
from nanogpt.options import describe_options


def help_text(config_name: str, schema: type, overrides: list[str]) -> str:
    """--help: the groups this entry point composes, with their options, and every key's meaning.

    Values are those the command line would run with (its overrides composed), so
    ``model=tiny --help`` shows tiny's shape.
    """
    lines = [f"python -m nanogpt.{config_name} [group=option ...] [key=value ...]", ""]
    groups = [f.name for f in dataclasses.fields(schema) if (CONFIG_DIR / f.name).is_dir()]
    if groups:
        lines.append("Config groups (choose one option each):")
        lines += [f"  {group}: {', '.join(sorted(p.stem for p in (CONFIG_DIR / group).glob('*.yaml')))}"
                  for group in groups]
        if "model" in groups:
            recipes = sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))
            lines.append(f"  +experiment: {', '.join(recipes)}")
        lines.append("")
    values = composed_values(config_name, overrides)
    lines.append("Keys (key=value), with the values this command line would use:")
    for key, kind, default, meaning in describe_options(schema):
        value = values.get(key, default)
        lines.append(f"  {key}: {kind} = {'(required)' if value == '???' else repr(value)}")
        if meaning:
            lines.append(f"      {meaning}")
    lines += ["", "Hydra: --cfg job (print the composed config), -m (sweep), --hydra-help, "
              "--shell-completion install=bash"]
    return "\n".join(lines)


def composed_values(config_name: str, overrides: list[str]) -> dict:
    """{dotted.key: value} of conf/<config_name>.yaml with overrides; {} if they do not compose."""
    try:
        with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra.compose(config_name=config_name, overrides=overrides)
    except Exception:  # noqa: BLE001 (help still shows the schema's defaults for a bad command line)
        return {}

    try:
        return flatten(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException:  # an interpolation that cannot resolve yet: show it as written
        return flatten(OmegaConf.to_container(cfg, resolve=False))
