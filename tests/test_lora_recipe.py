"""The LoRA path's defaults in a recipe run (issue 21): ``--set calibration.trainable=lora`` on
the digits demo trains at most 5% of the parameters, with a narrower router embedding that a
recipe's own ``convert.router_embed_dim`` overrides."""

from __future__ import annotations

import pytest

import dynconvert
from dynconvert.calibration.trainable import (
    LORA_ROUTER_EMBED_DIM,
    attach_lora,
    select_trainable,
)
from dynconvert.demo.digits import build_digits
from dynconvert.recipes import load_recipe

pytest.importorskip("peft")


def test_the_digits_lora_default_trains_at_most_5_percent(tmp_path):
    recipe = load_recipe("digits")
    assert recipe.convert_config().router_embed_dim == 256  # `all` keeps the default
    recipe.calibration["trainable"] = "lora"
    convert = recipe.convert_config()
    assert convert.router_embed_dim == LORA_ROUTER_EMBED_DIM
    model = dynconvert.convert(build_digits(), 0.5, config=convert)
    cfg = recipe.calibration_config(output_dir=str(tmp_path))
    attach_lora(model, cfg)
    trained = sum(p.numel() for p in select_trainable(model, cfg))
    total = sum(p.numel() for p in model.parameters())
    assert 0.03 < trained / total <= 0.05, (trained, total)
    encoder = dynconvert.get_state(model).t_embed
    assert all(p.requires_grad for p in encoder.parameters())  # frozen, no unit ever turns off


def test_a_recipe_that_sets_the_router_embedding_keeps_it():
    recipe = load_recipe("digits")
    recipe.calibration["trainable"] = "lora"
    recipe.convert["router_embed_dim"] = 128
    assert recipe.convert_config().router_embed_dim == 128
