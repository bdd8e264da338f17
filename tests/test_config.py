import pytest

from poetlm import POETConfig


@pytest.mark.parametrize("field,value,allowed", [
    ("variant", "xs", "bs"),
    ("block_size", 1, ">= 2"),
    ("block_size", 64.0, ">= 2"),
    ("block_size", True, ">= 2"),
    ("fraction", 0.0, "0 < fraction"),
    ("fraction", 1.5, "0 < fraction"),
    ("fraction", "half", "0 < fraction"),
    ("parameterization", "householder", "cayley_neumann"),
    ("neumann_terms", 0, ">= 1"),
    ("neumann_terms", 2.5, ">= 1"),
    ("merge_every", 0, ">= 1"),
    ("init", "zeros", "normalized_gaussian"),
    ("target_modules", [], "non-empty list"),
    ("target_modules", ["q_proj", 3], "non-empty list"),
    ("exclude_modules", "lm_head", "list of module names"),
    ("forward_mode", "fast", "auto"),
    ("seed", "0", "integer"),
])
def test_every_invalid_value_names_field_value_and_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError) as info:
        POETConfig(**{field: value})
    message = str(info.value)
    assert f"POETConfig.{field}={value!r}" in message and allowed in message


def test_defaults_and_dict_round_trip():
    config = POETConfig()
    assert (config.variant, config.block_size, config.parameterization, config.neumann_terms,
            config.merge_every, config.init) == ("bs", 256, "cayley_neumann", 4, 200, "normalized_gaussian")
    assert POETConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown field.*'blocksize'"):
        POETConfig.from_dict({"blocksize": 3})
