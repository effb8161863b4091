"""What every command that runs a trained model shares: where the model comes from, how it samples.

``python -m nanogpt.sample``, ``chat`` and ``eval`` each take a model the same way
(``ckpt=``, ``meta=``, ``outputs=``, ``quantize=``, ``device.*``: ModelOptions) and
open it with open_model(); those that generate text share the sampling knobs
(``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``: SamplingOptions, whose keys
are generation/sampling.py's SamplingSettings). Each command's
config extends one of these, so its keys, --help and checks are declared here once.
Nothing here imports Hydra.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from nanogpt.generation.language_model import LanguageModel
from nanogpt.generation.sampling import SamplingSettings
from nanogpt.options import check_choices, option
from nanogpt.runtime.device import DeviceConfig, resolve_device, resolve_dtype, set_threads, should_compile
from nanogpt.weights.checkpoint import newest_checkpoint
from nanogpt.weights.loading import require_source_packages, resolve_source
from nanogpt.weights.quantize import QUANTIZATIONS


@dataclass
class ModelOptions:
    """Which trained model a command runs, and on what."""

    ckpt: str | None = option(None, "the model: a run dir or .pt file, nanoGPT's out_dir or ckpt.pt, a "
                                    "Hugging Face directory, or gpt2 | gpt2-medium | gpt2-large | "
                                    "gpt2-xl; null: the newest run under `outputs`")
    meta: str | None = option(None, "karpathy/nanoGPT checkpoints: their meta.pkl, when it is not "
                                    "data/<dataset>/meta.pkl under the current directory")
    outputs: str = option("outputs", "where to look for the newest run when ckpt is not given")
    quantize: str | None = option(None, "int8: store Linear weights as int8 with per-row scales (CPU "
                                        "only), for faster generation; the output changes a little. "
                                        "null: as trained", choices=QUANTIZATIONS)
    device: DeviceConfig = option(default_factory=DeviceConfig)

    def __post_init__(self) -> None:
        check_choices(self)

    def require_packages(self) -> None:
        require_source_packages(self.ckpt)


@dataclass
class SamplingOptions(SamplingSettings, ModelOptions):
    """A model, and how it picks each next token (the keys of SamplingSettings, declared there)."""

    def __post_init__(self) -> None:
        ModelOptions.__post_init__(self)
        SamplingSettings.__post_init__(self)


def provenance(lm: LanguageModel) -> list[str]:
    """What a command says on stderr of the weights it runs.

    Ours know their iteration, and an untrained model (a run stopped before its first step)
    is warned of.
    """
    iteration = lm.source.iteration
    if iteration is None:
        return []
    lines = [f"{lm.source.where}: iteration {iteration}"]
    if iteration == 0:
        lines.append(f"warning: {lm.source.where} is untrained (its run stopped before its first step): "
                     "it writes noise")
    return lines


def open_model(options: ModelOptions, doing: str) -> LanguageModel:
    """The model options name, on its device, ready to run; without ckpt, the newest run's.

    doing ("sampling", "evaluating", ...) says on stderr which checkpoint was
    picked when it was not named.
    """
    source = options.ckpt or newest_checkpoint(options.outputs)
    device = resolve_device(options.device.name)
    set_threads(options.device.threads)
    if not options.ckpt:
        print(f"{doing} the newest run's checkpoint: {source}", file=sys.stderr)
    loaded = resolve_source(source, key="ckpt", meta=options.meta)
    return LanguageModel(loaded, device, resolve_dtype(options.device.dtype, device), options.quantize,
                         should_compile(options.device.compile, device, generating=True),
                         options.device.cuda_graphs)
