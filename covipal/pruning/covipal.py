"""CoViPAL: the PPM scores every token of the merged input; the top floor(r · n_v) visual tokens enter the LLM."""

from __future__ import annotations

from pathlib import Path

import torch

from covipal.errors import CovipalError
from covipal.models.ppm import PPMClassifier, PPMConfig
from covipal.pruning.budget import check_ratio, keep_top_visual, visual_budget
from covipal.pruning.context import LayerContext

RANDOM = "random"


class CoViPALPruner:
    drop_layers = (0,)

    def __init__(
        self,
        reserve_ratio: float = 0.25,
        classifier: str | None = None,
        ppm: dict | None = None,
        seed: int = 0,
    ):
        """classifier: a PPM checkpoint directory, or "random" for an explicitly untrained PPM built from `ppm`
        (PPMConfig fields without `input_size`, which comes from the model)."""
        self.reserve_ratio = check_ratio(reserve_ratio)
        if classifier is None:
            raise CovipalError(
                "pruner=covipal needs a trained classifier: set classifier=/path/to/ppm (train one with "
                "`python -m covipal.train stage=1`), or classifier=random for an untrained PPM"
            )
        self.classifier = str(classifier)
        self.ppm_overrides = dict(ppm or {})
        self.seed = seed
        self.ppm: PPMClassifier | None = None

    def setup(self, model) -> None:
        width = model.config.text_config.hidden_size
        if self.ppm is None:
            if self.classifier == RANDOM:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    self.ppm = PPMClassifier(PPMConfig(input_size=width, **self.ppm_overrides))
            else:
                try:
                    self.ppm = PPMClassifier.from_pretrained(Path(self.classifier), expected_input_size=width)
                except (FileNotFoundError, ValueError) as error:
                    raise CovipalError(str(error)) from None
        elif self.ppm.config.input_size != width:
            raise CovipalError(
                f"the PPM reads width {self.ppm.config.input_size} but this model's LLM width is {width}; "
                "use a classifier trained for this model"
            )
        parameter, own = next(model.parameters()), next(self.ppm.parameters())
        if (own.device, own.dtype) != (parameter.device, parameter.dtype):  # the model's precision (bf16 on GPU)
            self.ppm.to(device=parameter.device, dtype=parameter.dtype)
        # (moving it when it is already there still rewrites every weight, and the next forward's matrix products
        # on CPU then run at half speed: a cost every session entry would pay, measured in docs/efficiency.md)
        self.ppm.eval()

    def scores(self, context: LayerContext) -> torch.Tensor:
        """PPM scores [B, T] of every token (the session only uses the visual ones)."""
        with torch.no_grad():
            return self.ppm(context.hidden_states, attention_mask=context.attention_mask)

    def select(self, context: LayerContext) -> torch.Tensor:
        budget = visual_budget(context.n_visual, self.reserve_ratio)
        return keep_top_visual(self.scores(context), context.visual, budget)
