"""Config values as users write them: exponent-notation numbers read as numbers in files and in --set."""
import pytest

from conftest import SMOKE
from dtp import config as config_lib

# Spellings YAML 1.1 (PyYAML's safe_load) reads as strings, and one it already reads as a number.
SPELLINGS = [("1e-3", 1e-3), ("1E-3", 1e-3), ("2e4", 2e4), ("1.0e3", 1e3)]


@pytest.mark.parametrize("text,number", SPELLINGS)
def test_exponent_numbers_in_a_config_file(tmp_path, text, number):
    path = tmp_path / "run.yaml"
    path.write_text(f"forward:\n  lr: {text}\nfeedback:\n  lr: [{text}, {text}]\n")
    cfg = config_lib.resolve(str(path), {}, [])
    assert cfg["forward"]["lr"] == number and isinstance(cfg["forward"]["lr"], float)
    assert cfg["feedback"]["lr"] == [number, number]


@pytest.mark.parametrize("text,number", SPELLINGS)
def test_exponent_numbers_in_set(text, number):
    cfg = config_lib.resolve(SMOKE, {}, [f"forward.lr={text}", f"feedback.lr=[{text},{text}]"])
    assert cfg["forward"]["lr"] == number and isinstance(cfg["forward"]["lr"], float)
    assert cfg["feedback"]["lr"] == [number, number]


@pytest.mark.parametrize("text,value", [
    ("-1e-3", -1e-3), ("+2E+4", 2e4),  # signed, also new
    ("1.5", 1.5), ("3", 3), ("0x10", 16), ("1_000", 1000), ("true", True),  # as YAML 1.1 reads them
    ("e3", "e3"), ("1e", "1e"), ("1e3.5", "1e3.5"), ("cosine", "cosine"),  # not numbers
])
def test_signed_exponents_are_numbers_and_other_values_parse_as_before(text, value):
    parsed = config_lib.parse_set(f"forward.scheduler={text}")["forward"]["scheduler"]
    assert parsed == value and type(parsed) is type(value)


def test_a_word_stays_a_string_and_is_checked_as_one():
    cfg = config_lib.resolve(SMOKE, {}, ["forward.scheduler=step"])
    assert cfg["forward"]["scheduler"] == "step"
    with pytest.raises(config_lib.ConfigError, match="forward.lr must be a positive number, got 'fast'"):
        config_lib.resolve(SMOKE, {}, ["forward.lr=fast"])
