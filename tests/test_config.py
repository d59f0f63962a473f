"""Config values as users write them: exponent-notation numbers read as numbers in files and in --set."""
import pytest
import torch

from conftest import SMOKE
from dtp import config as config_lib

# Spellings YAML 1.1 (PyYAML's safe_load) reads as strings, and one it already reads as a number.
SPELLINGS = [("1e-3", 1e-3), ("1E-3", 1e-3), ("2e4", 2e4), ("1.0e3", 1e3)]


@pytest.mark.parametrize("text,number", SPELLINGS)
def test_exponent_numbers_in_a_config_file(tmp_path, text, number):
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  channels: [8, 8]\nforward:\n  lr: {text}\nfeedback:\n  lr: [{text}, {text}]\n")
    cfg = config_lib.resolve(str(path), {}, [])
    assert cfg.forward.lr == number and isinstance(cfg.forward.lr, float)
    assert cfg.feedback.lr == (number, number)


@pytest.mark.parametrize("text,number", SPELLINGS)
def test_exponent_numbers_in_set(text, number):
    cfg = config_lib.resolve(SMOKE, {}, [f"forward.lr={text}", f"feedback.lr=[{text},{text}]"])
    assert cfg.forward.lr == number and isinstance(cfg.forward.lr, float)
    assert cfg.feedback.lr == (number, number)


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
    assert cfg.forward.scheduler == "step"
    with pytest.raises(config_lib.ConfigError, match="forward.lr must be a positive number, got 'fast'"):
        config_lib.resolve(SMOKE, {}, ["forward.lr=fast"])


@pytest.mark.parametrize("assignment,message", [
    ("feedback.init_symmetric=maybe", "feedback.init_symmetric must be true or false, got 'maybe'"),
    ("model.channels=8", "model.channels must be a list, got 8"),
    ("model.channels=[8,0]", "every entry of model.channels must be a positive integer, got 0"),
    ("feedback.iterations=[2,2.5,2,2,2]", "every entry of feedback.iterations must be a positive integer, got 2.5"),
    ("log.every=0", "log.every must be a positive integer, got 0"),
    ("early_stopping.patience=-1", "early_stopping.patience must be 0 \\(off\\) or a positive integer, got -1"),
    ("forward.momentum=-0.5", "forward.momentum must be a number ≥ 0, got -0.5"),
    ("seed=true", "seed must be an integer, got True"),
    ("model=3", "config key 'model' is a section; give it a mapping, not 3"),
    ("model.arch=vgg", "model.arch is 'vgg'; choose one of simple_vgg, lenet, resnet18, resnet34"),
    ("forward.betta=1", "unknown config key 'forward.betta' \\(did you mean 'forward.beta'\\?\\)"),
])
def test_each_value_is_checked_against_its_field(assignment, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.resolve(SMOKE, {}, [assignment])


def test_a_config_is_a_frozen_typed_value_that_round_trips_through_its_plain_form():
    cfg = config_lib.resolve(SMOKE, {}, [])
    assert cfg.feedback.iterations == (2, 3, 2, 2, 2) and cfg.model.channels == (4, 4, 8, 8, 8)
    with pytest.raises(AttributeError):
        cfg.seed = 1
    plain = cfg.to_dict()
    assert plain["feedback"]["lr"] == [1e-3, 1e-3, 8e-3, 8e-3, 0.05] and config_lib.build(plain) == cfg


def test_a_config_file_without_a_network_names_what_to_give(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("forward:\n  lr: 0.01\n")
    with pytest.raises(config_lib.ConfigError, match="model.channels is not set; a config file gives the network"):
        config_lib.resolve(str(path), {}, [])


def test_a_dataset_without_its_own_config_starts_from_the_reference_one():
    cfg = config_lib.resolve(None, {"dataset": "npz", "data_dir": "mine.npz", "algorithm": "tp"}, [])
    reference = config_lib.resolve(None, {"algorithm": "tp"}, [])
    assert cfg.dataset == "npz" and cfg.data_dir == "mine.npz"
    assert (cfg.model, cfg.feedback, cfg.forward) == (reference.model, reference.feedback, reference.forward)
    assert cfg.forward.lr == 1e-3  # configs/cifar10_tp.yaml's, not the code's default


def test_shapes_has_vanilla_dtp_and_tp_configs_the_default_lookup_finds():
    shapes = config_lib.resolve(str(config_lib.CONFIG_DIR / "shapes.yaml"), {}, [])
    for algorithm in ("vanilla_dtp", "tp"):
        cfg = config_lib.resolve(None, {"dataset": "shapes", "algorithm": algorithm}, [])
        assert cfg.algorithm == algorithm and cfg.model == shapes.model and cfg.epochs == shapes.epochs
        assert cfg.forward.lr == 1e-3
    vanilla = config_lib.resolve(None, {"dataset": "shapes", "algorithm": "vanilla_dtp"}, [])
    tp = config_lib.resolve(None, {"dataset": "shapes", "algorithm": "tp"}, [])
    assert vanilla.feedback.optimizer == "adam" and vanilla.feedback.lr == (1e-4, 1e-4, 1e-4)
    assert tp.feedback.optimizer == "sgd" and tp.feedback.lr == tuple(lr / 100 for lr in shapes.feedback.lr)


def test_the_cuda_graphs_switch_is_off_by_default_and_on_only_where_cuda_is():
    from dtp.graphs import graphs_enabled

    assert config_lib.resolve(SMOKE, {}, []).feedback.cuda_graphs == "off"
    with pytest.raises(config_lib.ConfigError, match="feedback.cuda_graphs is 'always'; choose one of auto, on, off"):
        config_lib.resolve(SMOKE, {}, ["feedback.cuda_graphs=always"])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [graphs_enabled(s, cpu) for s in ("auto", "off")] == [False, False]
    assert [graphs_enabled(s, cuda) for s in ("auto", "on", "off")] == [True, True, False]
    with pytest.raises(config_lib.ConfigError, match="CUDA graphs need a GPU: set it to auto or off"):
        graphs_enabled("on", cpu)
