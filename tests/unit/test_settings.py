"""Worker settings: TOML + environment precedence, refusals, and the policy they build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedbus.aggregation import Constant, FedAsync, FedBuff, ServerAdam, Threshold
from fedbus.cli.errors import UserError
from workers.settings import load
from workers.strategy import build


def test_toml_then_environment_then_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "fedbus.toml"
    cfg.write_text(
        'model = "cardio"\nrequire_signatures = true\npublic_keys_dir = "keys"\n'
        '[aggregation]\nalgorithm = "fedbuff"\nbuffer_size = 7\n'
        'robust = "trimmed_mean"\n[mqtt]\nport = 1999\n'
    )
    monkeypatch.setenv("FEDBUS_AGGREGATION__BUFFER_SIZE", "9")
    s = load(cfg, transport="kafka")
    assert (s.model, s.transport, s.mqtt.port) == ("cardio", "kafka", 1999)
    assert s.aggregation.buffer_size == 9  # environment beats the file
    assert s.aggregation.robust == "trimmed_mean"


def test_every_policy_knob_reaches_the_policy_object() -> None:
    s = load(
        None,
        require_signatures=True,
        public_keys_dir=Path("keys"),
        aggregation={
            "algorithm": "fedbuff",
            "buffer_size": 4,
            "max_deferred": 1,
            "staleness": "threshold",
            "staleness_b": 3,
            "server_optimizer": "adam",
            "server_lr": 0.01,
            "robust": "median",
        },
    )
    p = build(s.aggregation, np.zeros(3), version=5)
    assert isinstance(p, FedBuff) and (p.k, p.max_deferred, p.version) == (4, 1, 5)
    assert p.staleness == Threshold(cutoff=3)
    assert isinstance(p.optimizer, ServerAdam) and p.optimizer.lr == 0.01
    assert p.robust == "median"
    a = build(
        load(None, aggregation={"algorithm": "fedasync", "staleness": "constant",
                                "direction": "paper", "alpha": 0.3}).aggregation,
        np.zeros(3), version=0,
    )  # fmt: skip
    assert isinstance(a, FedAsync) and a.staleness == Constant() and a.direction == "paper"


@pytest.mark.parametrize(
    "aggregation, message",
    [
        ({"dp_noise_multiplier": 1.0}, "needs clip_norm"),
        ({"algorithm": "fedasync", "robust": "median"}, "need a buffer"),
        ({"alpha": 0.0}, "alpha"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"robust": "mean-ish"}, "robust"),
        ({"privacy_budget": 8.0}, "needs central DP"),
        ({"clip_norm": 1.0, "dp_noise_multiplier": 1.0, "dp_delta": 1.5}, "dp_delta"),
    ],
)
def test_inconsistent_policies_are_refused_at_start(aggregation: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as refused:
        load(None, aggregation=aggregation)
    assert "\n" not in str(refused.value)  # one line, naming the setting
    assert "aggregation" in str(refused.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"aggregation": {"robust": "median"}}, "aggregation.robust needs require_signatures"),
        (
            {"aggregation": {"dp_noise_multiplier": 1.0, "clip_norm": 1.0, "robust": "median"}},
            "aggregation.robust and aggregation.dp_noise_multiplier needs require_signatures",
        ),
        ({"require_signatures": True}, "needs public_keys_dir"),
    ],
)
def test_robust_and_dp_need_signatures(overrides: dict, message: str) -> None:
    """One contribution per device is what robust aggregation and DP rely on; without
    signatures nothing enforces it, so such a configuration does not start."""
    with pytest.raises(UserError, match=message) as refused:
        load(None, **overrides)
    assert "\n" not in str(refused.value)
    keys = {"require_signatures": True, "public_keys_dir": Path("keys")}
    if "aggregation" in overrides:
        assert load(None, **overrides, **keys).require_signatures


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model_codec": "topk:fraction=0.1"}, "model_codec: model codec must be one of fp32"),
        ({"model_codec": "bf16"}, "model_codec: unknown codec 'bf16'"),
        ({"model_diff_codec": "fp32"}, "model_diff_codec: model difference codec must be"),
        ({"model_keyframe_every": 0}, "model_keyframe_every"),
    ],
)
def test_downlink_settings_are_checked(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as refused:
        load(None, **overrides)
    assert "\n" not in str(refused.value)


def test_downlink_settings_accept_the_documented_codecs() -> None:
    assert load(None).model_diff_codec == "int8"  # following devices get int8 differences
    s = load(None, model_codec="int8", model_diff_codec="topk:fraction=0.05")
    assert (s.model_codec, s.model_diff_codec, s.model_keyframe_every) == (
        "int8",
        "topk:fraction=0.05",
        10,
    )


_SECURE_AGG = {"algorithm": "fedbuff", "clip_norm": 1.0, "max_staleness": 4}


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"role": "leader", "aggregation": _SECURE_AGG}, "secure.enabled = true and secure"),
        (
            {"role": "helper", "secure": {"enabled": True, "keys_dir": "k"},
             "aggregation": {"algorithm": "fedbuff", "clip_norm": 1.0}},
            "aggregation.clip_norm and aggregation.max_staleness",
        ),
        (
            {"role": "leader", "secure": {"enabled": True, "keys_dir": "k"},
             "aggregation": {**_SECURE_AGG, "robust": "median"}, "require_signatures": True,
             "public_keys_dir": "k"},
            "robust aggregation keeps every update",
        ),
        (
            {"role": "leader", "secure": {"enabled": True, "keys_dir": "k"},
             "aggregation": {**_SECURE_AGG, "dp_noise_multiplier": 1.0, "privacy_budget": 5.0},
             "require_signatures": True, "public_keys_dir": "k"},
            "privacy_budget is not supported in secure mode",
        ),
        ({"secure": {"enabled": True, "min_buffer": 1}}, "secure.min_buffer"),
    ],
)  # fmt: skip
def test_secure_roles_refuse_what_secure_mode_cannot_run(overrides: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as refused:
        load(None, **overrides)
    assert "\n" not in str(refused.value)


def test_a_secure_section_may_sit_in_a_config_every_tool_reads() -> None:
    s = load(None, secure={"enabled": True, "keys_dir": "k"}, aggregation=_SECURE_AGG)
    assert s.role == "all" and s.secure.enabled
