"""Command-line overrides and dotted keys, read one way: Hydra's own parser.

Sweeps (what a job varies), resume (which saved overrides a new one replaces),
the GPU suite (a run's own overrides under the suite's) and reports (what each
job of a sweep was given) all read overrides through parse_overrides().
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf


def parse_overrides(overrides: list[str]) -> list[Override]:
    """Hydra's parsed form of command-line overrides."""
    return OverridesParser.create().parse_overrides(list(overrides))


def override_values(overrides: list[str]) -> dict[str, str]:
    """{key: value as written} of overrides; ``+experiment=x`` gives experiment: x."""
    return {o.key_or_group: o.get_value_element_as_str() for o in parse_overrides(overrides)}


def merge_overrides(own: list[str], given: list[str]) -> list[str]:
    """Own with given laid over it: an override of given replaces own's for the same key."""
    keys = {o.key_or_group for o in parse_overrides(given)}
    kept = [o.input_line for o in parse_overrides(own) if o.key_or_group not in keys]
    return kept + list(given)


def job_overrides(run_dir: Path) -> dict[str, str]:
    """The overrides a Hydra job was started with (its .hydra/overrides.yaml); {} when there are none."""
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    return override_values([str(item) for item in OmegaConf.load(path)]) if path.is_file() else {}


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as {dotted.key: value}."""
    flat: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def quote(value: str) -> str:
    """A string as a single-quoted Hydra override value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
