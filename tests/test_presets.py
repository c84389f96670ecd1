"""Presets list only what differs from the defaults (maskco/config.py, and MOCOV2 for method: mocov2)."""
from __future__ import annotations

import os

import pytest
import yaml

from maskco.config import MOCOV2, PRESET_DIR, Config, build_config

PRESETS = sorted(name[:-5] for name in os.listdir(PRESET_DIR) if name.endswith(".yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_lists_only_what_differs_from_the_defaults(preset):
    with open(os.path.join(PRESET_DIR, preset + ".yaml"), encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    defaults = Config().to_dict()
    if raw.get("method") == "mocov2":  # the values that method: mocov2 brings when a preset leaves them unset
        defaults.update(MOCOV2)
    loaded = build_config([preset]).to_dict()
    repeated = [key for key in raw if loaded[key] == defaults[key]]
    assert repeated == [], f"{preset} repeats defaults: {repeated}"
