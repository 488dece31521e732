"""The CLI's choices, the config schema and the router math agree with the registries they come from."""
import typing

import click

from moeforge.cli import cli
from moeforge.config import GateMode, MoEConfig
from moeforge.gate_modes import GATE_MODE_NAMES, GATE_MODES, RANDOM_GATE_MODES
from moeforge.layouts import LAYOUT_NAMES, LAYOUTS, MoEShape, layout_of_config


def _choices(command: str, option: str):
    cmd = cli.commands[command]
    param = next(p for p in cmd.params if option in p.opts)
    assert isinstance(param.type, click.Choice)
    return tuple(param.type.choices)


def test_cli_choices_are_the_registries():
    assert _choices("upcycle", "--architecture") == LAYOUT_NAMES
    assert _choices("add-expert", "--gate-mode") == GATE_MODE_NAMES
    assert _choices("upcycle", "--gate-mode") == RANDOM_GATE_MODES


def test_schema_is_the_gate_mode_table():
    assert typing.get_args(GateMode) == GATE_MODE_NAMES
    assert tuple(MoEConfig.model_json_schema()["properties"]["gate_mode"]["enum"]) == GATE_MODE_NAMES


def test_every_gate_mode_has_router_math_and_card_text():
    from moeforge.gates.compute import _MODES

    assert set(_MODES) == set(GATE_MODES)
    assert all(m.card for m in GATE_MODES.values())
    assert RANDOM_GATE_MODES and all(not GATE_MODES[m].runs_base_model for m in RANDOM_GATE_MODES)


def test_every_layout_reads_back_what_it_writes():
    """config.json -> layout -> shape: the registry recognises each layout's own config and inverts its keys."""
    assert len(set(LAYOUT_NAMES)) == len(LAYOUTS)
    for layout in LAYOUTS:
        shared = max(layout.min_shared_experts, 1) if layout.shared_expert else 0
        shape = MoEShape(6, 2, 24, shared, 24 * shared)
        config = {"architectures": list(layout.architectures), "model_type": layout.model_type,
                  **layout.moe_config(shape)}
        assert layout_of_config(config) is layout
        assert layout.shape_of(config) == shape, layout.name
        for key, aliases in layout.key_aliases.items():
            for alias in aliases:  # the other spelling, alone, reads the same
                renamed = {(alias if k == key else k): v for k, v in config.items()}
                assert layout.shape_of(renamed) == shape, (layout.name, alias)
