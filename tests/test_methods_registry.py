"""The method registry and its declarations: names, parameters, defaults, scopes and ranges,
validation of values, and the declarations against mergekit's.
"""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys

import pytest

from conftest import ROOT
from kernels import merge, t
from mbuild import methods
from mbuild.methods import REQUIRED, Method, Parameter

# The seven core methods (linear, SLERP, passthrough and the task-arithmetic core) and the other
# methods registered beside them; between them, every registered method.
CORE_METHODS = {"dare_linear", "dare_ties", "linear", "passthrough", "slerp", "task_arithmetic", "ties"}
OTHER_METHODS = {
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "karcher",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "ram",
    "ramplus_tl",
    "sce",
}


# ---------------------------------------------------------------------------------------------
# Registry and declarations


def test_import_does_not_import_torch():
    code = "import mbuild.methods, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_built_in_method_is_registered_sorted():
    names = [method.name for method in methods.all_methods()]
    assert names == sorted(names)
    assert CORE_METHODS <= set(names)
    assert methods.get("ties").name == "ties"


def test_unknown_method_is_key_error():
    with pytest.raises(KeyError, match="no_such_method"):
        methods.get("no_such_method")


def test_duplicate_registration_is_rejected(monkeypatch):
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("linear"))
    fresh = Method(name="test_only", kernel=lambda *a, **k: None, parameters=(), paper="x")
    assert methods.register(fresh) is fresh
    assert methods.get("test_only") is fresh


def test_method_parameter_lookup():
    ties = methods.get("ties")
    assert ties.parameter("density").default == 1.0
    with pytest.raises(KeyError):
        ties.parameter("t")


def test_declarations():
    linear = methods.get("linear")
    assert linear.parameter("weight").default is REQUIRED and linear.parameter("weight").per_model
    assert linear.parameter("normalize").default is True and not linear.parameter("normalize").per_model
    assert linear.base == "ignored" and not linear.random

    slerp = methods.get("slerp")
    assert (slerp.base, slerp.min_models, slerp.max_models) == ("required", 2, 2)
    assert (slerp.parameter("t").minimum, slerp.parameter("t").maximum) == (0.0, 1.0)

    expected = {  # name: (normalize, rescale, random)
        "task_arithmetic": (False, False, False),
        "ties": (True, False, False),
        "dare_linear": (False, True, True),
        "dare_ties": (False, True, True),
    }
    for name, (normalize, rescale, random) in expected.items():
        method = methods.get(name)
        assert method.base == "required" and method.random is random, name
        assert method.parameter("normalize").default is normalize, name
        assert method.parameter("rescale").default is rescale, name
        assert method.parameter("lambda").default == 1.0
        assert method.parameter("int8_mask").default is False
        assert not method.parameter("weight").applies_to_base
        assert method.parameter("weight").default is REQUIRED
        assert (method.parameter("density").minimum, method.parameter("density").maximum) == (0.0, 1.0)

    passthrough = methods.get("passthrough")
    assert passthrough.max_models == 1 and passthrough.parameter("scale").default is None

    for method in methods.all_methods():
        assert method.summary and method.paper.startswith("https://"), method.name


def test_other_methods_are_registered_with_their_families():
    assert OTHER_METHODS <= {method.name for method in methods.all_methods()}
    expected = {  # name: (base, min_models, max_models, random)
        "nuslerp": ("optional", 1, None, False),
        "multislerp": ("optional", 1, None, False),
        "karcher": ("ignored", 1, None, False),
        "model_stock": ("required", 3, None, False),
        "nearswap": ("required", 2, 2, False),
        "arcee_fusion": ("required", 2, 2, True),
        "sce": ("required", 1, None, False),
        "ram": ("required", 1, None, False),
        "ramplus_tl": ("required", 1, None, False),
        "breadcrumbs": ("required", 1, None, False),
        "breadcrumbs_ties": ("required", 1, None, False),
        "della": ("required", 1, None, True),
        "della_linear": ("required", 1, None, True),
    }
    for name, declared in expected.items():
        method = methods.get(name)
        assert (method.base, method.min_models, method.max_models, method.random) == declared, name
        assert method.summary and method.paper.startswith("https://"), name


def test_other_methods_parameters_defaults_scopes_and_ranges():
    expected = {  # (method, parameter): (default, per_model, applies_to_base)
        ("nuslerp", "weight"): (REQUIRED, True, False),
        ("nuslerp", "nuslerp_row_wise"): (False, False, True),
        ("nuslerp", "nuslerp_flatten"): (True, False, True),
        ("multislerp", "weight"): (REQUIRED, True, False),
        ("multislerp", "normalize_weights"): (True, False, True),
        ("multislerp", "eps"): (1e-8, False, True),
        ("karcher", "max_iter"): (10, False, True),
        ("karcher", "tol"): (1e-5, False, True),
        ("model_stock", "filter_wise"): (False, False, True),
        ("nearswap", "t"): (REQUIRED, False, True),
        ("sce", "int8_mask"): (False, False, True),
        ("sce", "select_topk"): (1.0, False, True),
        ("ram", "epsilon"): (1e-5, False, True),
        ("ramplus_tl", "r"): (0.1, False, True),
        ("ramplus_tl", "alpha"): (0.2, False, True),
        ("ramplus_tl", "epsilon"): (1e-5, False, True),
        ("breadcrumbs", "gamma"): (0.01, True, False),
        ("breadcrumbs_ties", "gamma"): (0.01, True, False),
        ("della", "epsilon"): (0.15, True, False),
        ("della_linear", "epsilon"): (0.15, True, False),
    }
    for (name, parameter_name), (default, per_model, applies_to_base) in expected.items():
        parameter = methods.get(name).parameter(parameter_name)
        assert parameter.default == default or parameter.default is default, (name, parameter_name)
        assert (parameter.per_model, parameter.applies_to_base) == (per_model, applies_to_base), (name, parameter_name)
    assert methods.get("karcher").parameter("max_iter").type is int
    for name, parameter_name in (("breadcrumbs", "gamma"), ("della", "epsilon"), ("sce", "select_topk")):
        parameter = methods.get(name).parameter(parameter_name)
        assert parameter.validate(0) == 0.0 and parameter.validate(1) == 1.0
        with pytest.raises(ValueError):
            parameter.validate(1.5)
        with pytest.raises(ValueError):
            parameter.validate(-0.1)
    with pytest.raises(ValueError):
        methods.get("nearswap").parameter("t").validate(-0.5)


def test_method_declaration_is_checked():
    with pytest.raises(ValueError, match="base"):
        Method(name="x", kernel=print, parameters=(), paper="p", base="sometimes")
    weight = Parameter("weight", float, per_model=True)
    with pytest.raises(ValueError, match="twice"):
        Method(name="x", kernel=print, parameters=(weight, weight), paper="p")


def test_required_survives_pickle_and_copy():
    assert pickle.loads(pickle.dumps(REQUIRED)) is REQUIRED
    assert copy.deepcopy(methods.get("linear")).parameter("weight").default is REQUIRED
    assert repr(REQUIRED) == "REQUIRED"


# ---------------------------------------------------------------------------------------------
# Parameter.validate


def test_validate_float_accepts_int_and_coerces():
    weight = methods.get("linear").parameter("weight")
    value = weight.validate(2)
    assert value == 2.0 and type(value) is float


@pytest.mark.parametrize("bad", [True, "0.5", None, [0.5], float("nan"), float("inf")])
def test_validate_float_rejects(bad):
    with pytest.raises(ValueError):
        methods.get("linear").parameter("weight").validate(bad)


def test_validate_range_is_inclusive_and_named_in_message():
    density = methods.get("ties").parameter("density")
    assert density.validate(0) == 0.0 and density.validate(1) == 1.0
    with pytest.raises(ValueError, match=r"from 0 to 1, got 1\.5"):
        density.validate(1.5)
    with pytest.raises(ValueError, match=r"got -0\.1"):
        density.validate(-0.1)
    one_sided = Parameter("k", int, per_model=False, default=1, minimum=1)
    with pytest.raises(ValueError, match="at least 1"):
        one_sided.validate(0)


def test_validate_bool_int_str_and_optional():
    normalize = methods.get("linear").parameter("normalize")
    assert normalize.validate(False) is False
    for bad in (1, 0, "true"):
        with pytest.raises(ValueError):
            normalize.validate(bad)
    count = Parameter("k", int, per_model=False, default=1)
    assert count.validate(3) == 3
    for bad in (True, 2.5):
        with pytest.raises(ValueError):
            count.validate(bad)
    label = Parameter("label", str, per_model=False, default="a")
    assert label.validate("b") == "b"
    with pytest.raises(ValueError):
        label.validate(3)
    scale = methods.get("passthrough").parameter("scale")
    assert scale.validate(None) is None and scale.validate(2) == 2.0
    with pytest.raises(ValueError):  # None only where None is the default
        methods.get("ties").parameter("density").validate(None)


def test_parameter_rejects_default_out_of_range():
    with pytest.raises(ValueError):
        Parameter("density", float, per_model=True, default=2.0, minimum=0.0, maximum=1.0)


# ---------------------------------------------------------------------------------------------
# The declarations against mergekit's (skipped without mergekit)


def test_declarations_match_mergekit(mergekit_methods):
    from mergekit.merge_methods.base import MISSING, BasePolicy, ParameterScope

    for ours in methods.all_methods():
        spec = mergekit_methods.get(ours.name).spec
        assert {p.name for p in ours.parameters} == {p.name for p in spec.parameters}, ours.name
        assert ours.base == {
            BasePolicy.REQUIRED: "required",
            BasePolicy.IGNORED: "ignored",
            BasePolicy.OPTIONAL: "optional",
        }[spec.contract.base]
        assert (ours.min_models, ours.max_models) == (spec.contract.min_inputs or 1, spec.contract.max_inputs)
        for theirs in spec.parameters:
            mine = ours.parameter(theirs.name)
            assert mine.per_model == (theirs.scope != ParameterScope.SHARED), (ours.name, theirs.name)
            assert mine.applies_to_base == (theirs.scope != ParameterScope.NON_BASE), (ours.name, theirs.name)
            expected_default = REQUIRED if theirs.default is MISSING else theirs.default
            assert mine.default == expected_default or mine.default is expected_default, (ours.name, theirs.name)


def test_other_methods_declarations_and_non_base_counts_match_mergekit(mergekit_methods):
    from mergekit.merge_methods.base import MISSING, BasePolicy, ParameterScope

    policies = {BasePolicy.REQUIRED: "required", BasePolicy.IGNORED: "ignored", BasePolicy.OPTIONAL: "optional"}
    for name in sorted(OTHER_METHODS):
        ours, spec = methods.get(name), mergekit_methods.get(name).spec
        assert {p.name for p in ours.parameters} == {p.name for p in spec.parameters}, name
        assert ours.base == policies[spec.contract.base], name
        assert (ours.min_models, ours.max_models) == (spec.contract.min_inputs or 1, spec.contract.max_inputs), name
        for theirs in spec.parameters:
            mine = ours.parameter(theirs.name)
            assert mine.per_model == (theirs.scope != ParameterScope.SHARED), (name, theirs.name)
            assert mine.applies_to_base == (theirs.scope != ParameterScope.NON_BASE), (name, theirs.name)
            expected_default = REQUIRED if theirs.default is MISSING else theirs.default
            assert mine.default == expected_default or mine.default is expected_default, (name, theirs.name)
    # mergekit's only non-base counts (nuslerp exactly 2, multislerp at least 1) are kernel checks here
    assert mergekit_methods.get("nuslerp").spec.contract.min_non_base == 2
    assert mergekit_methods.get("nuslerp").spec.contract.max_non_base == 2
    assert mergekit_methods.get("multislerp").spec.contract.min_non_base == 1
    with pytest.raises(ValueError, match="at least one model"):
        merge("multislerp", [t(1.0)], base_index=0, weight=[None])
