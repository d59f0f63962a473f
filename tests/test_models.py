"""Networks and their automatically inverted feedback networks (docs/design.md §2–3)."""
import pytest
import torch
from torch import nn

from conftest import ROOT, load, model_config, train_in_process
from dtp.config import build, load_yaml
from dtp.diagnostics import weight_alignment
from dtp.errors import ConfigError
from dtp.models import BasicBlock, DTPNetwork, InvertedBasicBlock, build_forward, invert_block


@pytest.mark.parametrize(
    "cfg, in_shape, n_blocks",
    [
        (model_config("simple_vgg", [128, 128, 256, 256, 512], "elu"), (3, 32, 32), 6),
        (model_config("simple_vgg", [4, 8], "relu"), (1, 28, 28), 3),
        (model_config("simple_vgg", [4, 8, 8], "elu"), (3, 30, 30), 4),
        (model_config("lenet", [6, 16], "elu", hidden=32), (3, 32, 32), 4),
        (model_config("lenet", [6, 16], "relu", hidden=32), (1, 28, 28), 4),
        (model_config("lenet", [4, 4, 4], "elu", hidden=8), (3, 15, 15), 5),
        (model_config("resnet18", [4, 8, 8, 8], "relu"), (3, 32, 32), 6),
        (model_config("resnet34", [4, 8, 8, 8], "relu"), (1, 28, 28), 6),
        (model_config("resnet18", [2, 2, 4, 4], "elu"), (3, 9, 11), 6),
    ],
)
def test_feedback_blocks_map_outputs_back_to_input_shapes(cfg, in_shape, n_blocks):
    net = DTPNetwork(cfg, in_shape, 10, seed=0)
    assert len(net.forward_blocks) == len(net.feedback_blocks) == n_blocks
    x = torch.randn(2, *in_shape)
    for block, feedback in zip(net.forward_blocks, net.feedback_blocks):
        y, idx = block(x)
        back = feedback(y, idx)
        assert back.shape == x.shape
        x = y
    assert x.shape == (2, 10)


def test_simple_vgg_layout_matches_the_reference():
    net = DTPNetwork(model_config("simple_vgg", [128, 128, 256, 256, 512], "elu"),
                     (3, 32, 32), 10, seed=0)
    first = net.forward_blocks[0].layers
    assert isinstance(first[0], nn.Conv2d) and first[0].kernel_size == (3, 3) and first[0].padding == (1, 1)
    assert isinstance(first[1], nn.ELU) and isinstance(first[2], nn.MaxPool2d)
    assert [s[-1] for s in net.block_output_shapes] == [16, 8, 4, 2, 1, 10]
    g = net.feedback_blocks[1].layers
    assert [type(m) for m in g] == [nn.MaxUnpool2d, nn.ELU, nn.ConvTranspose2d]
    assert g[2].in_channels == 128 and g[2].out_channels == 128
    last = net.feedback_blocks[5].layers
    assert isinstance(last[0], nn.Linear) and last[0].in_features == 10 and last[0].out_features == 512


def test_unpool_uses_the_indices_it_is_given():
    net = DTPNetwork(model_config("simple_vgg", [4, 4], "elu"), (3, 8, 8), 10, seed=0)
    x = torch.randn(2, 3, 8, 8)
    y, idx = net.forward_blocks[0](x)
    _, other = net.forward_blocks[0](x + torch.randn_like(x))
    g = net.feedback_blocks[0]
    # Unpooling puts each pooled value back where the given indices say, zeros elsewhere.
    unpooled = g.layers[0](y, idx[0], output_size=(8, 8))
    assert torch.equal(unpooled.flatten(2).gather(2, idx[0].flatten(2)), y.flatten(2))
    assert int((unpooled != 0).sum()) == int((y != 0).sum())
    assert not torch.equal(g(y, idx), g(y, other))


def test_feedback_weights_start_unaligned_with_the_transposed_forward_weights():
    """Independent initialisations: W and Bᵀ start near 90° apart (a transposed or scaled copy would be at 0°)."""
    net = DTPNetwork(model_config("simple_vgg", [16, 16], "elu"), (3, 8, 8), 10, seed=0)
    for i in range(1, net.n_feedback + 1):
        angle, _ = weight_alignment(net.forward_blocks[i], net.feedback_blocks[i])
        assert 70.0 < angle < 110.0, (i, angle)



def test_building_a_network_leaves_the_global_rng_alone_and_keeps_its_seeded_weights():
    """The initial weights are those the global generator seeded with seed (forward) and seed + 1
    (feedback) gives, as before, but the caller's global random state is untouched."""
    cfg, in_shape = model_config("resnet18", [2, 2, 4, 4], "elu"), (3, 9, 11)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    net = DTPNetwork(cfg, in_shape, 10, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    forward = build_forward(cfg, in_shape, 10)
    torch.manual_seed(8)
    feedback = [invert_block(block, shape) for block, shape in zip(forward, net.block_input_shapes)]
    expected = [t for block in forward + feedback for t in block.state_dict().values()]
    built = [t for blocks in (net.forward_blocks, net.feedback_blocks) for block in blocks
             for t in block.state_dict().values()]
    assert len(built) == len(expected) and all(torch.equal(a, b) for a, b in zip(built, expected))

def test_network_that_does_not_fit_the_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="does not fit 32x32 inputs.*at most 5"):
        DTPNetwork(model_config("simple_vgg", [8] * 6, "elu"), (3, 32, 32), 10, seed=0)


def test_lenet_layout_matches_the_published_one():
    """ernoult/scalingDTP target_prop/networks/lenet.py: conv5x5 (padding 2) → act → maxpool 3/2 (padding 1) per
    channel entry, then flatten → linear(512) → act, then linear(n_classes); 64·8·8 = 4096 inputs on 32x32."""
    net = DTPNetwork(model_config("lenet", [32, 64], "elu", hidden=512), (3, 32, 32), 10,
                     seed=0)
    conv, act, pool = net.forward_blocks[0].layers
    assert conv.kernel_size == (5, 5) and conv.padding == (2, 2) and isinstance(act, nn.ELU)
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert [tuple(s) for s in net.block_output_shapes] == [(32, 16, 16), (64, 8, 8), (512,), (10,)]
    hidden = net.forward_blocks[2].layers
    assert [type(m) for m in hidden] == [nn.Flatten, nn.Linear, nn.ELU] and hidden[1].in_features == 4096
    assert net.n_feedback == 3
    assert [type(m) for m in net.feedback_blocks[1].layers] == [nn.MaxUnpool2d, nn.ELU, nn.ConvTranspose2d]
    assert [type(m) for m in net.feedback_blocks[2].layers] == [nn.ELU, nn.Linear, nn.Unflatten]


def test_overlapping_unpool_puts_every_maximum_back_where_it_came_from_on_odd_sizes():
    net = DTPNetwork(model_config("lenet", [3], "elu", hidden=4), (2, 15, 15), 10, seed=0)
    conv, act, _ = net.forward_blocks[0].layers
    x = torch.randn(2, 2, 15, 15)
    before_pool = act(conv(x))
    y, idx = net.forward_blocks[0](x)
    assert y.shape[-2:] == (8, 8)
    unpool = net.feedback_blocks[0].layers[0]
    back = unpool(y, idx[0], output_size=net.feedback_blocks[0].output_sizes[0])
    assert back.shape == before_pool.shape
    placed = back != 0
    assert torch.equal(back[placed], before_pool[placed]) and int(placed.sum()) > 0


@pytest.mark.parametrize("arch, stage_blocks", [("resnet18", [2, 2, 2, 2]), ("resnet34", [3, 4, 6, 3])])
def test_resnet_layout_matches_the_published_one(arch, stage_blocks):
    """ernoult/scalingDTP target_prop/networks/resnet.py (CIFAR ResNet, batch norm off): 3x3 stem, four stages
    of basic blocks with widths 64..512 and strides 1, 2, 2, 2, 1x1 shortcut convs where the shape changes,
    convolutions without bias, average pool and a linear classifier; inverted block by block."""
    net = DTPNetwork(model_config(arch, [64, 128, 256, 512], "relu"), (3, 32, 32), 10, seed=0)
    assert [tuple(s) for s in net.block_output_shapes] == [
        (64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (10,)]
    assert net.n_feedback == 5
    stem_conv, stem_act = net.forward_blocks[0].layers
    assert stem_conv.kernel_size == (3, 3) and stem_conv.bias is None and isinstance(stem_act, nn.ReLU)
    for stage, count, stride in zip(net.forward_blocks[1:5], stage_blocks, (1, 2, 2, 2)):
        assert [type(b) for b in stage.layers] == [BasicBlock] * count
        assert [b.conv1.stride for b in stage.layers] == [(stride, stride)] + [(1, 1)] * (count - 1)
        assert all(b.conv1.bias is None and b.conv2.bias is None for b in stage.layers)
        shortcuts = [b.shortcut for b in stage.layers]
        assert shortcuts[1:] == [None] * (count - 1)
        assert (shortcuts[0] is None) == (stride == 1)
        if shortcuts[0] is not None:
            assert shortcuts[0].kernel_size == (1, 1) and shortcuts[0].stride == (2, 2) and shortcuts[0].bias is None
    assert [type(m) for m in net.forward_blocks[5].layers] == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear]
    for stage, feedback in zip(net.forward_blocks[1:5], net.feedback_blocks[1:5]):
        assert [type(g) for g in feedback.layers] == [InvertedBasicBlock] * len(stage.layers)
        first = feedback.layers[-1]  # inverts the stage's first block
        assert first.conv1.stride == stage.layers[0].conv1.stride and first.conv1.bias is None
    assert [type(m) for m in net.feedback_blocks[5].layers] == [nn.Linear, nn.Unflatten, nn.AdaptiveAvgPool2d]


def test_basic_block_and_its_inverse_compute_the_published_formulas():
    net = DTPNetwork(model_config("resnet18", [2, 3, 3, 3], "relu"), (2, 8, 8), 10, seed=0)
    f, g = net.forward_blocks[2].layers[0], net.feedback_blocks[2].layers[-1]
    x = torch.randn(3, 2, 8, 8)
    torch.testing.assert_close(f(x), torch.relu(f.conv2(torch.relu(f.conv1(x))) + f.shortcut(x)))
    y = torch.randn(3, 3, 4, 4)
    r = torch.relu(y)
    torch.testing.assert_close(g(y), g.conv1(torch.relu(g.conv2(r))) + g.shortcut(r))
    assert g(y).shape == x.shape


@pytest.mark.parametrize("cfg, in_shape", [
    (model_config("resnet18", [2, 3, 3, 4], "relu"), (3, 8, 8)),
    (model_config("lenet", [3, 4], "elu", hidden=6), (3, 9, 9)),
])
def test_init_symmetric_sets_every_feedback_weight_to_its_forward_twins_transpose(cfg, in_shape):
    """Layer j of a block pairs with layer L−1−j of its feedback block; inside a residual block by name."""
    net = DTPNetwork(cfg, in_shape, 10, seed=0)
    net.init_feedback_symmetric()
    for f, g in zip(net.forward_blocks, net.feedback_blocks):
        forward = {n: p for n, p in f.named_parameters() if p.dim() > 1}
        feedback = {n: p for n, p in g.named_parameters() if p.dim() > 1}
        assert len(forward) == len(feedback)  # every feedback weight has a forward twin
        for name, w in forward.items():
            _, j, rest = name.split(".", 2)
            twin = feedback[f"layers.{len(f.layers) - 1 - int(j)}.{rest}"]
            assert torch.equal(twin, w.t() if w.dim() == 2 else w), name


@pytest.mark.parametrize("cfg, in_shape, message", [
    (model_config("resnet18", [4, 8, 8], "relu"), (3, 32, 32), "exactly 4 model.channels"),
    (model_config("resnet34", [4, 8, 8, 8], "relu"), (3, 6, 6), "at least 8x8, not 6x6"),
    (model_config("lenet", [4] * 6, "elu", hidden=8), (1, 28, 28), "at most 5"),
])
def test_a_network_that_does_not_fit_its_config_or_input_is_a_clear_error(cfg, in_shape, message):
    with pytest.raises(ConfigError, match=message):
        DTPNetwork(cfg, in_shape, 10, seed=0)


def test_model_hidden_must_be_a_positive_integer():
    with pytest.raises(ConfigError, match="model.hidden must be a positive integer"):
        build({"model": {"channels": [8], "hidden": 0}})


# Tiny widths and one feedback iteration per block: seconds per architecture.
TINY = {
    "lenet": ["--set", "model.channels=[4,4]", "--set", "model.hidden=8", "--set", "feedback.iterations=[1,1,1]"],
    "resnet18": ["--set", "model.channels=[4,4,8,8]", "--set", "feedback.iterations=[1,1,1,1,1]"],
    "resnet34": ["--set", "model.channels=[4,4,8,8]", "--set", "feedback.iterations=[1,1,1,1,1]"],
}


@pytest.mark.parametrize("arch", TINY)
def test_each_architecture_trains_two_dtp_steps_from_its_shipped_config(tmp_path, monkeypatch, tiny_npz, arch):
    config = ROOT / "configs" / f"cifar10_{arch}_dtp.yaml"
    out = tmp_path / "run"
    train_in_process(monkeypatch, "--config", str(config), "--dataset", "npz", "--data-dir", str(tiny_npz),
                     "--batch-size", "16", "--max-steps", "2", *TINY[arch], "--out", str(out))
    ckpt = load(out)
    shipped = load_yaml(config)
    assert ckpt["step"] == 2 and ckpt["config"]["model"]["arch"] == arch
    # The shipped file's settings are the ones that ran (those the test does not override).
    assert ckpt["config"]["feedback"]["lr"] == shipped["feedback"]["lr"]
    assert ckpt["config"]["forward"]["lr"] == shipped["forward"]["lr"]
    assert ckpt["config"]["model"]["activation"] == shipped["model"].get("activation", "elu")
    assert all(torch.isfinite(t).all() for key in ("forward", "feedback") for t in ckpt[key].values())
