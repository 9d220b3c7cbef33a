"""Backbones: the output shapes they state are the ones they return (also for MAML's stride-2
Omniglot network and the reference's unpadded Relation Network), and per-task batch norm:
each task normalised with its own statistics, running averages moved by the mean of the
per-task ones, and exactly ``nn.BatchNorm2d`` for one task."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fewshot_lightning.algorithms.episode_ops import per_task
from fewshot_lightning.models import MLP, Conv4, RelationEmbedding
from fewshot_lightning.models.blocks import TaskBatchNorm2d


@pytest.mark.parametrize(
    "backbone, image, shape",
    [
        (Conv4(hidden=8, out_features=None), (1, 28, 28), (8,)),  # 28 -> 14 -> 7 -> 3 -> 1
        (Conv4(hidden=8, out_features=5), (1, 28, 28), (5,)),
        (Conv4(in_channels=3, hidden=8, out_features=None, image_size=84), (3, 84, 84), (8 * 5 * 5,)),  # 84 -> 5
        # cbfinn/maml on Omniglot: stride 2, no pooling, 28 -> 14 -> 7 -> 4 -> 2, mean of the 2x2 map.
        (Conv4(hidden=8, out_features=None, max_pool=False), (1, 28, 28), (8,)),
        (RelationEmbedding(hidden=8), (1, 28, 28), (8, 7, 7)),
        (RelationEmbedding(hidden=8, padding=0), (1, 28, 28), (8, 5, 5)),
        (MLP(3, (4,), 2), (3,), (2,)),
    ],
)
def test_backbones_return_the_output_shape_they_state(backbone, image, shape):
    assert backbone.output_shape == shape
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, *image)).shape == (2, 3, *shape)  # [tasks, samples, *output]


def test_stride_two_conv4_has_no_pooling_and_averages_its_last_map():
    torch.manual_seed(0)
    backbone = Conv4(hidden=8, out_features=None, max_pool=False)
    assert not any(isinstance(m, nn.MaxPool2d) for m in backbone.modules())
    assert [block[0].stride for block in backbone.features] == [(2, 2)] * 4
    images = torch.randn(5, 1, 28, 28)
    maps = images.unsqueeze(1)  # the blocks take [samples, tasks, C, H, W]
    for block in backbone.features:
        maps = block(maps)
    assert maps.shape == (5, 1, 8, 2, 2)
    # The features are the mean of the last map (the reference's reduce_mean over height and width).
    torch.testing.assert_close(backbone(images), maps.mean((-2, -1)).squeeze(1))


def batch_norm_reference(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Normalise ``[M, C, H, W]`` over its samples and pixels, per channel (biased variance)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def test_task_batch_norm_normalises_each_task_alone_and_averages_their_statistics():
    torch.manual_seed(0)
    norm = TaskBatchNorm2d(3, momentum=0.1)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        norm.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
    # Three tasks of 4 samples with very different statistics (scales 1, 5 and 25, shifts 0, 10, 20).
    tasks = [scale * torch.randn(4, 3, 2, 2) + shift for scale, shift in ((1, 0), (5, 10), (25, 20))]
    out = norm(torch.stack(tasks, 1))  # sample-major [M, T, C, H, W]
    for t, x in enumerate(tasks):
        expected = batch_norm_reference(x) * norm.weight.view(1, 3, 1, 1) + norm.bias.view(1, 3, 1, 1)
        torch.testing.assert_close(out[:, t], expected, rtol=1e-5, atol=1e-5)
    # Running averages: (1 - 0.1) * initial + 0.1 * mean over tasks of each task's statistics
    # (the unbiased variance, as nn.BatchNorm2d keeps).
    means = torch.stack([x.mean((0, 2, 3)) for x in tasks]).mean(0)
    variances = torch.stack([x.var((0, 2, 3), unbiased=True) for x in tasks]).mean(0)
    torch.testing.assert_close(norm.running_mean, 0.1 * means)
    torch.testing.assert_close(norm.running_var, 0.9 * torch.ones(3) + 0.1 * variances)
    assert norm.num_batches_tracked.item() == 1
    # Evaluation with running statistics: each sample on its own, the same in any batch.
    norm.eval()
    batch = torch.stack(tasks, 1)
    torch.testing.assert_close(norm(batch)[:, 2], norm(batch[:, 2:3])[:, 0])


def test_task_batch_norm_is_batch_norm_for_one_task_and_loads_its_checkpoints():
    torch.manual_seed(0)
    plain, per_task_norm = nn.BatchNorm2d(3), TaskBatchNorm2d(3)
    per_task_norm.load_state_dict(plain.state_dict())
    x = torch.randn(6, 3, 4, 4)
    torch.testing.assert_close(per_task_norm(x.unsqueeze(1)).squeeze(1), plain(x))
    torch.testing.assert_close(per_task_norm(x), plain(x))
    torch.testing.assert_close(per_task_norm.running_var, plain.running_var)


def test_foreign_batch_norm_under_vmap_follows_the_same_rule_as_task_batch_norm():
    """A backbone with plain nn.BatchNorm2d runs once per task under vmap; it must give the
    outputs and running averages of the same network built on TaskBatchNorm2d."""
    torch.manual_seed(0)
    ours = Conv4(hidden=4, out_features=None, image_size=16, track_running_stats=True)
    foreign = nn.Sequential(*(nn.Sequential(b[0], nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)) for b in ours.features),
                            nn.Flatten())
    foreign.load_state_dict({k.replace("features.", ""): v for k, v in ours.state_dict().items()})
    images = torch.randn(5, 6, 1, 16, 16) * torch.arange(1.0, 6.0).view(5, 1, 1, 1, 1)  # tasks of different scales
    for mode in ("task", "running"):
        torch.testing.assert_close(per_task(foreign, images, mode), per_task(ours, images, mode), rtol=1e-4, atol=1e-5)
    # One training call each in "running" mode moved both sets of averages the same way.
    for ours_norm, foreign_norm in zip((b[1] for b in ours.features), (b[1] for b in foreign[:4])):
        torch.testing.assert_close(foreign_norm.running_mean, ours_norm.running_mean)
        torch.testing.assert_close(foreign_norm.running_var, ours_norm.running_var)
        assert foreign_norm.num_batches_tracked == ours_norm.num_batches_tracked == 1


def test_conv4_names_an_image_too_small():
    with pytest.raises(ValueError, match="image_size 8 is too small"):
        Conv4(image_size=8)


def plain_conv4(net: Conv4) -> nn.Sequential:
    """The textbook network (conv, batch norm, ReLU, max-pool; NCHW) with ``net``'s weights."""
    layers = []
    for block in net.features:
        conv, norm = block[0], block[1]
        plain_norm = nn.BatchNorm2d(norm.num_features, track_running_stats=False)
        plain_norm.weight, plain_norm.bias = norm.weight, norm.bias  # the same parameters
        layers += [conv, plain_norm, nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers, nn.Flatten(), net.head)


def test_conv4_computes_the_textbook_network_with_its_gradients_of_gradients():
    # Conv4 pools before the ReLU and runs one task channels-last: the same function, with the
    # same first and second derivatives, as conv -> batch norm -> ReLU -> max-pool in NCHW.
    # float64, so that agreement to 1e-10 means the same mathematics, not float32 noise.
    torch.manual_seed(0)
    net = Conv4(hidden=8, out_features=5, image_size=16).double()
    reference = plain_conv4(net)
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    labels = torch.arange(6) % 5
    results = []
    for model in (net, reference):
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), list(net.parameters()))
        results.append((model(x), grads, second))
    (out, grads, second), (ref_out, ref_grads, ref_second) = results
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    for mine, theirs in zip(grads + second, ref_grads + ref_second):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)
    # Under vmap (no channels-last there) the same numbers again.
    batched = torch.func.vmap(net)(x.unsqueeze(0).expand(2, *x.shape))
    torch.testing.assert_close(batched[1], ref_out, rtol=0, atol=1e-12)


def test_a_block_told_to_keep_the_layout_runs_one_task_nchw_with_the_same_numbers(monkeypatch):
    # ConvBlock.one_task_channels_last=False keeps a lone task's maps in the layout they came
    # in (NCHW here): the convolutions see channels-first input, and the outputs are unchanged.
    torch.manual_seed(0)
    net = Conv4(in_channels=3, hidden=8, out_features=5, image_size=16)
    x = torch.randn(6, 3, 16, 16)
    expected = net(x)
    layouts = []
    convolve = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward",
                        lambda self, inputs, weight, bias: (layouts.append(inputs.is_contiguous()), convolve(
                            inputs, weight, bias, self.stride, self.padding, self.dilation, self.groups))[1])
    net(x)
    assert layouts == [False] * 4  # by default a lone task runs channels-last (not NCHW-contiguous)
    layouts.clear()
    for block in net.features:
        block.one_task_channels_last = False
    torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)
    assert layouts == [True] * 4


def test_a_lone_task_switches_to_channels_last_on_the_cpu_only(monkeypatch):
    # The switch was measured on a CPU only: on another device (here the meta device, which
    # computes shapes and strides without data) a lone task's maps keep the layout given.
    torch.manual_seed(0)
    block = Conv4(in_channels=3, hidden=8, out_features=5, image_size=16).features[1]
    layouts = []
    convolve = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward",
                        lambda self, inputs, weight, bias: (layouts.append(inputs.is_contiguous()), convolve(
                            inputs, weight, bias, self.stride, self.padding, self.dilation, self.groups))[1])
    x = torch.randn(6, 1, 8, 8, 8)  # [samples, tasks=1, C, H, W]
    block(x)
    meta_out = copy.deepcopy(block).to("meta")(x.to("meta"))
    assert layouts == [False, True]  # the CPU's convolution sees channels-last maps, the meta one NCHW
    assert meta_out.shape == (6, 1, 8, 4, 4)
