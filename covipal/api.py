"""The Python API: the same configs and objects the command line uses.

from covipal import api
cfg = api.compose("eval", ["model=tiny", "pruner=fastv", "pruner.reserve_ratio=0.25"])
loaded, pruner = api.build_model(cfg), api.build_pruner(cfg)
answers = api.generate_answers(loaded, pruner, samples, max_new_tokens=8)
"""

from __future__ import annotations

from collections.abc import Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig

from covipal.cli import CONFIG_DIR, check_group_choices, find_user_error
from covipal.data.sample import Sample
from covipal.errors import CovipalError
from covipal.inference import Answer, generate_answers
from covipal.models.loading import LoadedModel
from covipal.pruning.context import Pruner

__all__ = ["Answer", "CovipalError", "Sample", "build_model", "build_pruner", "compose", "generate_answers", "load"]


def compose(config_name: str = "eval", overrides: Sequence[str] = ()) -> DictConfig:
    """Compose a config from `configs/` exactly as the command line would (without Hydra's run directory)."""
    check_group_choices(overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def _instantiate(node):
    try:
        return instantiate(node)
    except HydraException as error:
        found = find_user_error(error)
        if found is not None:
            raise found from None
        raise


def build_model(cfg: DictConfig) -> LoadedModel:
    return _instantiate(cfg.model)


def build_pruner(cfg: DictConfig) -> Pruner:
    return _instantiate(cfg.pruner)


def load(model: str = "tiny", pruner: str = "none", *overrides: str) -> tuple[LoadedModel, Pruner]:
    """Shortcut: `load("tiny", "covipal", "classifier=random", "pruner.reserve_ratio=0.5")`."""
    cfg = compose("eval", [f"model={model}", f"pruner={pruner}", *overrides])
    return build_model(cfg), build_pruner(cfg)
