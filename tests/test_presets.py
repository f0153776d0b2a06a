"""The contract of settings: one preset table, the same field for a use whichever adapter
builds it, explicit settings win, and misuse names the class the user called."""

import inspect

import pytest
import torch

import pyro_cnf
from pyro_cnf import CNF, CNFTransform, ConditionalCNF, ContinuousFlow, ODENet, cnf, default_flow
from pyro_cnf.flow import FIELD_OPTIONS, FLOW_OPTIONS
from pyro_cnf.presets import PRESETS, Preset, for_lr, get_preset


def field_settings(flow: ContinuousFlow) -> dict:
    state = flow.vector_field.get_extra_state()
    return {k: v for k, v in state.items() if k not in ("input_dim", "context_dim")}


def preset_settings(preset: Preset) -> dict:
    """What a field built from ``preset`` must hold (its architecture: the initialisation
    scale ``time_gate_scale`` is checked on the parameters instead)."""
    return {k: v for k, v in preset.field.items() if k != "time_gate_scale"}


BUILDERS = {
    "default_flow": lambda name: default_flow(3, preset=name),
    "CNF": lambda name: CNF(3, preset=name).flow,
    "cnf": lambda name: cnf(3, preset=name).flow,
    "ConditionalCNF": lambda name: ConditionalCNF(3, 2, preset=name).flow,
    "CNFTransform": lambda name: CNFTransform(3, preset=name).flow,
    "CNFTransform(context)": lambda name: CNFTransform(3, context_dim=2, preset=name).flow,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_the_same_field_through_every_adapter(name):
    preset = PRESETS[name]
    solver = ContinuousFlow(ODENet(1), **preset.flow).solver
    for builder in BUILDERS.values():
        flow = builder(name)
        assert flow.preset == name
        assert field_settings(flow) == preset_settings(preset)
        assert flow.solver == solver
        # the time gates start at the preset's scale (stored divided by the time gain)
        gates = flow.vector_field.time_gate * flow.vector_field.time_gain
        assert gates.std().item() == pytest.approx(preset.field["time_gate_scale"], rel=0.5)


def test_each_builder_starts_from_its_documented_preset():
    assert CNF(2).flow.preset == cnf(2).flow.preset == "guide"
    assert CNFTransform(2).flow.preset == default_flow(2).preset == "density"
    assert ConditionalCNF(2, 1).flow.preset == CNFTransform(2, context_dim=1).flow.preset == "conditional"
    # ODENet's defaults: the conditional field
    assert field_settings(default_flow(2, preset="conditional")) == field_settings(ContinuousFlow(ODENet(2)))


def test_explicit_settings_replace_the_presets():
    flow = CNF(2, (8,), preset="density", activation="silu", rtol=1e-7, method="bosh3")
    assert flow.flow.vector_field.activation == "silu" and flow.flow.vector_field.input_gain == 16.0
    assert flow.flow.vector_field.hidden_dims == (8,)
    assert (flow.flow.method, flow.flow.rtol, flow.flow.train_rtol) == ("bosh3", 1e-7, 1e-7)
    # a method given by the user comes without the preset's grid
    demo = default_flow(2, preset="demo")
    assert (demo.method, demo.steps) == ("rk4", 4)
    assert default_flow(2, preset="demo", method="dopri5").steps is None


def test_presets_are_read_only_and_complete():
    with pytest.raises(TypeError):
        PRESETS["density"].field["activation"] = "relu"
    for preset in PRESETS.values():
        assert set(preset.field) <= FIELD_OPTIONS | {"hidden_dims"}
        assert set(preset.flow) <= FLOW_OPTIONS
        low, high = preset.lr_range
        assert 0 < low <= preset.lr <= high and preset.reason
    assert for_lr("density", 1e-2) is PRESETS["density_high_lr"] and for_lr("density", 5e-4) is PRESETS["density"]


def test_repr_shows_the_preset_the_field_and_the_tolerances():
    text = repr(CNF(2))
    for part in ("preset='guide'", "activation='silu'", "scale_rate=4.0", "rtol=1e-05", "train_rtol=0.001"):
        assert part in text
    text = repr(CNFTransform(2, rtol=1e-8, atol=1e-8))
    assert "preset='density'" in text and "train_rtol=1e-08" in text and "scale_rate=4.0" in text
    assert "steps=4" in repr(default_flow(2, preset="demo"))


def test_signatures_list_the_settings():
    for owner in (CNF, ConditionalCNF, CNFTransform, cnf, pyro_cnf.conditional_cnf, default_flow):
        parameters = inspect.signature(owner).parameters
        assert {"preset", "activation", "scale_rate", "rtol", "train_rtol", "method", "trace"} <= set(parameters)
        assert not any(p.kind == p.VAR_KEYWORD for p in parameters.values())


class TestMisuse:
    @pytest.mark.parametrize("owner, call", [
        ("CNFTransform", lambda: CNFTransform(2, context_size=3)),
        ("CNF", lambda: CNF(2, width=3)),
        ("ConditionalCNF", lambda: ConditionalCNF(2, 1, activaton="silu")),
        ("default_flow", lambda: default_flow(2, hidden=3)),
    ])
    def test_an_unknown_setting_names_the_class_and_the_valid_ones(self, owner, call):
        with pytest.raises(TypeError, match=rf"^{owner}\(\) got unexpected keyword.*'activation'.*'rtol'"):
            call()

    def test_hidden_dims_must_be_a_sequence(self):
        with pytest.raises(TypeError, match=r"^CNF: hidden_dims must be a sequence of layer widths such as \(64, 64\), got 32"):
            CNF(2, hidden_dims=32)
        with pytest.raises(ValueError, match="CNFTransform: hidden_dims must hold positive integers"):
            CNFTransform(2, hidden_dims=(8, 0))

    def test_an_unknown_preset_lists_the_presets(self):
        with pytest.raises(ValueError, match=r"CNF: unknown preset 'fast'; expected one of \['conditional', 'demo'"):
            CNF(2, preset="fast")
        with pytest.raises(ValueError, match="CNFTransform: pass either flow= or settings"):
            CNFTransform(2, flow=default_flow(2), preset="density")

    def test_nflows_names(self):
        t = CNFTransform(features=3, context_features=2, hidden_features=16)
        assert (t.input_dim, t.flow.context_dim, t.flow.vector_field.hidden_dims) == (3, 2, (16, 16))
        assert CNFTransform(features=3, hidden_features=[8]).flow.vector_field.hidden_dims == (8,)
        with pytest.raises(TypeError, match="CNFTransform: missing the feature dimension: pass input_dim"):
            CNFTransform(hidden_dims=(8,))
        with pytest.raises(TypeError, match="CNFTransform: pass context_dim or nflows' name context_features"):
            CNFTransform(2, context_dim=1, context_features=1)

    def test_what_the_flow_says_is_taken_from_the_flow(self):
        conditional = default_flow(2, (8,), context_dim=3)
        t = CNFTransform(2, flow=conditional)
        assert t.flow.context_dim == 3
        z, ladj = t(torch.randn(4, 2), torch.randn(4, 3))
        assert z.shape == (4, 2) and ladj.shape == (4,)
        assert ConditionalCNF(2, flow=conditional).context_dim == 3
        with pytest.raises(ValueError, match="CNFTransform: context_dim=1 but the flow's field has context_dim=3"):
            CNFTransform(2, context_dim=1, flow=conditional)
        with pytest.raises(ValueError, match="CNF: input_dim=3 but the flow's field has input_dim=2"):
            CNF(3, flow=default_flow(2))


def test_get_preset_passes_a_preset_through():
    custom = Preset("mine", {"hidden_dims": (8,)}, lr=1e-3, lr_range=(1e-3, 1e-3), reason="a test")
    assert get_preset(custom) is custom
    assert default_flow(2, preset=custom).vector_field.hidden_dims == (8,)
