"""Recipe and command-line values are read as the user means them (YAML 1.2 booleans and
numbers) and converted to their fields' types, or refused naming the field."""
import math

import pytest

from distilkit.recipe import Recipe, parse_value
from distilkit.values import check_finite, coerce, load_yaml


@pytest.mark.parametrize("text, expected", [
    ("no", "no"), ("off", "off"), ("yes", "yes"), ("on", "on"),   # words, not booleans
    ("true", True), ("False", False), ("1e-4", 1e-4), ("2.5E3", 2500.0), ("10", 10),
    ("[0, 2]", [0, 2]), ("null", None),
])
def test_yaml_values(text, expected):
    assert load_yaml(text) == expected


def test_save_strategy_no_is_a_string_in_recipes_and_on_the_command_line():
    """Was: YAML 1.1 turned `no` into False and TrainingArguments refused it."""
    r = Recipe.from_dict(load_yaml("save_strategy: no\neval_strategy: no\nlearning_rate: 1e-4\n"))
    args = r.distil_config(output_dir="/tmp/unused")
    assert args.save_strategy == "no" and args.eval_strategy == "no"
    assert args.learning_rate == pytest.approx(1e-4)
    assert Recipe.from_dict({"save_strategy": parse_value("no")}).training["save_strategy"] == "no"


@pytest.mark.parametrize("field, value, message", [
    ("learning_rate", "abc", "learning_rate: 'abc' must be a number"),
    ("max_steps", "ten", "max_steps: 'ten' must be a whole number"),
    ("max_length", 12.5, "max_length: 12.5 must be a whole number"),
    ("fp16", "maybe", "fp16: 'maybe' must be true or false"),
    ("save_strategy", "sometimes", "save_strategy: 'sometimes' must be one of no, steps, epoch"),
    ("temperature", float("nan"), "temperature: nan is not a finite number"),
    ("alpha_kd", float("inf"), "alpha_kd: inf is not a finite number"),
    ("teacher_cache", "perhaps", "teacher_cache: 'perhaps' must be true or false"),
])
def test_a_value_of_the_wrong_type_names_its_field(field, value, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        Recipe.from_dict({field: value})


def test_nan_is_refused_inside_nested_values():
    with pytest.raises(ValueError, match=r"compression\[0\]\.bucket_size: inf"):
        Recipe.from_dict({"compression": [{"method": "quantize", "bucket_size": math.inf}]})
    with pytest.raises(ValueError, match=r"student\.num_layers: nan"):
        check_finite({"num_layers": math.nan}, "student")


def test_coerce_converts_to_the_declared_type():
    from typing import Optional, Union
    assert coerce("x", 3, float) == 3.0 and isinstance(coerce("x", 3, float), float)
    assert coerce("x", 4.0, int) == 4 and isinstance(coerce("x", 4.0, int), int)
    assert coerce("x", "yes", bool) is True and coerce("x", "off", Optional[bool]) is False
    assert coerce("x", 7, str) == "7"
    assert coerce("x", None, int) is None
    assert coerce("x", [1, 2], Union[str, list]) == [1, 2]


def test_yaml_syntax_errors_give_line_and_column():
    with pytest.raises(ValueError, match=r"r\.yaml: invalid YAML at line 2, column \d+"):
        load_yaml("name: x\n  bad: : here\n", "r.yaml")


def test_cli_bad_values_and_empty_recipe_are_one_line(tmp_path, capsys):
    from distilkit.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\n")
    assert main(["distill", str(recipe), "--learning_rate", "abc"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: 'abc' must be a number" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    recipe.write_text("")
    assert main(["distill", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and len(err.strip().splitlines()) == 1
    recipe.write_text("name: [unclosed\n")
    assert main(["distill", str(recipe)]) == 2
    assert "invalid YAML at line" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_lora_with_compression_must_be_merged():
    with pytest.raises(ValueError, match="save_merged_adapter: false"):
        Recipe.from_dict({"student": {"type": "from_teacher", "num_layers": 2,
                                      "lora": {"r": 4, "target_modules": ["query"]}},
                          "compression": [{"method": "quantize", "bits": 4}],
                          "save_merged_adapter": False})
