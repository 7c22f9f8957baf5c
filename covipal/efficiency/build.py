"""What one measurement is built from: a method's pruner from its config, and — for a fresh measuring process —
the model, the encoded input and the primed pruner of a request."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from covipal.api import build_model, compose
from covipal.cli import CONFIG_DIR
from covipal.efficiency.inputs import build_input
from covipal.efficiency.measure import encode, prime
from covipal.errors import CovipalError


def make_pruner(cfg: DictConfig, method: str, ratio: float):
    path = CONFIG_DIR / "pruner" / f"{method}.yaml"
    if not path.is_file():
        raise CovipalError(f"bench method {method!r} has no configs/pruner/{method}.yaml")
    node = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # unlocked copy: may gain `pruner`
    node.pruner = OmegaConf.load(path)
    node.pruner.reserve_ratio = ratio
    return instantiate(node.pruner)


def build_everything(request: dict):
    """For a fresh measuring process: the model, the encoded input and the primed pruner of `request`."""
    cfg = compose("bench", request["overrides"])
    loaded = build_model(cfg)
    encoded = encode(loaded.model, build_input(loaded, request["input"]))
    pruner = make_pruner(cfg, request["method"], request["ratio"])
    prime(loaded.model, pruner, encoded)
    return loaded, encoded, pruner
