"""GrainConfig: validation of every field, round trip through dicts and JSON."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import grainfx
from grainfx import ConfigError, GrainConfig

#: (field, bad value) pairs: out of range.
OUT_OF_RANGE = [
    ("steps", 0),
    ("steps", -3),
    ("steps", 2.5),
    ("epochs", 0),
    ("epochs", -1.0),
    ("epochs", math.inf),
    ("epochs", math.nan),
    ("learning_rate", 0.0),
    ("learning_rate", -1e-5),
    ("learning_rate", math.nan),
    ("learning_rate", math.inf),
    ("weight_decay", -0.01),
    ("adam_eps", 0.0),
    ("warmup", -0.1),
    ("warmup", 1.0),
    ("max_grad_norm", 0.0),
    ("temperature", 0.0),
    ("temperature", math.nan),
    ("hidden_every", 0),
    ("hidden_loss_weight", -1.0),
    ("hidden_loss_weight", math.nan),
    ("ema_beta", 1.0),
    ("ema_beta", -0.1),
    ("ema_beta", math.nan),
    ("prune_start", -0.1),
    ("prune_start", 0.5),
    ("prune_end", 1.5),
    ("prune_end", 0.1),
    ("prune_every", 0),
    ("structure_alpha", 0.0),
    ("granularity", "heads"),
    ("granularity", None),
    ("embedding_rank", 0),
    ("embedding_rank", 1.5),
    ("max_bad_steps", 0),
]

#: (field, bad value) pairs: a value of the wrong type (as YAML or a command line may give).
WRONG_TYPE = [
    ("learning_rate", "3e-5"),
    ("epochs", "20"),
    ("hidden_every", 1.5),
    ("prune_every", 2.5),
    ("max_bad_steps", 1.5),
    ("steps", True),
    ("hidden_loss", "no"),
    ("gradient_separation", "false"),
    ("seed", "x"),
]


@pytest.mark.parametrize("field,value", OUT_OF_RANGE)
def test_out_of_range_field_raises_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        GrainConfig(**{field: value})


@pytest.mark.parametrize("field,value", WRONG_TYPE)
def test_wrong_type_field_raises_config_error(field, value):
    with pytest.raises(ConfigError, match=field):
        GrainConfig(**{field: value})


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    assert grainfx.ConfigError is ConfigError


def test_defaults_are_the_paper_settings_but_the_ema_follows_the_run():
    c = GrainConfig()
    assert (c.epochs, c.learning_rate, c.weight_decay, c.adam_eps) == (20.0, 3e-5, 0.01, 1e-6)
    assert (c.warmup, c.max_grad_norm, c.temperature) == (0.1, 1.0, 8.0)
    assert (c.ema_beta, c.prune_start, c.prune_end, c.structure_alpha) == ("auto", 0.2, 0.4, 0.3)
    # 480 steps prune over 96 of them: 3 horizons of 32 steps; the paper's 0.998 is 500 steps
    assert c.beta(480) == 1 - 3 / 96 and GrainConfig(ema_beta=0.998).beta(480) == 0.998
    assert c.hidden_every == 2 and c.gradient_separation and c.structure_regularization
    assert c.granularity == "intra" and not c.random_scores


@pytest.mark.parametrize(
    "config",
    [
        GrainConfig(),
        GrainConfig(
            steps=7,
            learning_rate=1e-4,
            granularity="head",
            random_scores=True,
            output_name="logits",
            seed=3,
            hidden_loss=False,
            embedding_rank=4,
        ),
    ],
)
def test_dict_round_trip(config):
    data = config.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(GrainConfig)}
    assert GrainConfig.from_dict(data) == config
    assert GrainConfig.from_dict(json.loads(json.dumps(data))) == config


def test_from_dict_validates():
    data = GrainConfig().to_dict()
    data["warmup"] = 2.0
    with pytest.raises(ConfigError, match="warmup"):
        GrainConfig.from_dict(data)


def test_from_dict_unknown_field_raises_config_error():
    data = GrainConfig().to_dict()
    data["learning_rat"] = 1e-4
    with pytest.raises(ConfigError, match="learning_rat"):
        GrainConfig.from_dict(data)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GrainConfig().steps = 3


def test_auto_ema_beta_fits_a_few_horizons_into_the_pruning_window():
    from grainfx.config import AUTO_HORIZONS

    config = GrainConfig(ema_beta="auto", prune_start=0.2, prune_end=0.4)
    beta = config.beta(1000)  # a window of 200 steps
    assert 1 / (1 - beta) == pytest.approx(200 / AUTO_HORIZONS)
    assert GrainConfig(ema_beta=0.9).beta(1000) == 0.9
    assert 0 < config.beta(3) < 1  # a window shorter than the horizons still gives a factor
    with pytest.raises(ConfigError, match="ema_beta"):
        GrainConfig(ema_beta="fast")
    assert GrainConfig.from_dict(config.to_dict()) == config


def test_auto_ema_beta_needs_the_runs_length():
    from grainfx.importance import Importance
    from tests.captures import structure

    with pytest.raises(ConfigError, match="total_steps"):
        Importance(structure("bert-sdpa"), GrainConfig(ema_beta="auto"))
    assert Importance(structure("bert-sdpa"), GrainConfig(ema_beta="auto"), 500).beta < 0.998


@pytest.mark.parametrize("shape", [(8,), (0, 128), (8, 1.5), "8x128", (True, 4)])
def test_latency_shape_must_be_two_positive_ints(shape):
    with pytest.raises(ConfigError, match="latency_shape must be \\(batch, sequence\\)"):
        GrainConfig(latency_shape=shape)


def test_latency_shape_from_json_is_a_tuple_and_head_granularity_refuses_latency():
    config = GrainConfig.from_dict({**GrainConfig().to_dict(), "latency_shape": [4, 64]})
    assert config.latency_shape == (4, 64)
    with pytest.raises(ConfigError, match="granularity='intra' or latency_aware=False"):
        GrainConfig(latency_aware=True, granularity="head")
