"""Networks and their automatically inverted feedback networks (DESIGN.md §1–2)."""
import pytest
import torch
from torch import nn

from dtp.errors import ConfigError
from dtp.models import DTPNetwork


@pytest.mark.parametrize(
    "cfg, in_shape, n_blocks",
    [
        ({"arch": "simple_vgg", "channels": [128, 128, 256, 256, 512], "activation": "elu"}, (3, 32, 32), 6),
        ({"arch": "simple_vgg", "channels": [4, 8], "activation": "relu"}, (1, 28, 28), 3),
        ({"arch": "simple_vgg", "channels": [4, 8, 8], "activation": "elu"}, (3, 30, 30), 4),
        ({"arch": "lenet", "channels": [6, 16, 32], "activation": "elu"}, (3, 32, 32), 4),
        ({"arch": "lenet", "channels": [6, 16, 32], "activation": "relu"}, (1, 28, 28), 4),
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
    net = DTPNetwork({"arch": "simple_vgg", "channels": [128, 128, 256, 256, 512], "activation": "elu"},
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
    net = DTPNetwork({"arch": "simple_vgg", "channels": [4, 4], "activation": "elu"}, (3, 8, 8), 10, seed=0)
    x = torch.randn(2, 3, 8, 8)
    y, idx = net.forward_blocks[0](x)
    _, other = net.forward_blocks[0](x + torch.randn_like(x))
    g = net.feedback_blocks[0]
    assert torch.equal(g(y, idx), g(y, idx))
    assert not torch.equal(g(y, idx), g(y, other))


def test_feedback_weights_are_not_transposed_forward_weights():
    net = DTPNetwork({"arch": "simple_vgg", "channels": [4, 4], "activation": "elu"}, (3, 8, 8), 10, seed=0)
    assert not torch.allclose(net.forward_blocks[1].layers[0].weight, net.feedback_blocks[1].layers[2].weight)


def test_network_that_does_not_fit_the_input_is_a_clear_error():
    with pytest.raises(ConfigError, match="does not fit 32x32 inputs.*at most 5"):
        DTPNetwork({"arch": "simple_vgg", "channels": [8] * 6, "activation": "elu"}, (3, 32, 32), 10, seed=0)
