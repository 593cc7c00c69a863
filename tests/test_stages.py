"""The compiled stages (lenet/stages.py, _stages.c) against PyTorch's kernels."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lenet import stages
from lenet.models import TrainingView, create_model

built = pytest.mark.skipif(stages.variant() is None, reason="the kernels are not built here")


@pytest.fixture(params=["avx2", "plain"])
def build(request):
    """Each build of the kernels this machine can run (the plain one is what CPUs without AVX2,
    and other architectures, get)."""
    if stages.use(request.param) != request.param:
        stages.use("avx2")
        pytest.skip(f"this CPU cannot run the {request.param} build")
    yield request.param
    stages.use("avx2")


# (input maps, side, output maps, the kernel's function) of LeNet's two stages.
STAGES = {"first": (1, 28, 6, stages.first), "second": (6, 12, 16, stages.second)}


def test_the_kernels_are_built_on_linux():
    # setup.py builds them wherever there is a C compiler; every Linux machine of this
    # project has one, so a silent fallback here would hide a broken build.
    if not sys.platform.startswith("linux"):
        pytest.skip("built where a C compiler is found; only required on Linux")
    assert stages.variant() in ("avx2", "plain")
    assert stages.available()


def both(stage, x, conv, grad):
    """Pooled maps and the input, weight and bias gradients, PyTorch's way and the kernel's."""
    results = []
    for use_kernel in (False, True):
        layer = copy.deepcopy(conv)
        given = x.clone().requires_grad_(stage == "second")
        if use_kernel:
            out = STAGES[stage][3](given, layer)
        else:
            out = F.max_pool2d(layer(given), 2, 2)
        out.backward(grad)
        grad_x = given.grad.clone() if given.grad is not None else None
        results.append((out.detach(), grad_x, layer.weight.grad.clone(), layer.bias.grad.clone()))
    return results


def assert_same(results, rel=1e-5):
    expected, got = results
    scale = max(1.0, float(expected[0].abs().max()))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5 * scale)
    for what, e, g in zip(("input", "weight", "bias"), expected[1:], got[1:]):
        if e is None:
            assert g is None, what
            continue
        assert float((g - e).abs().max()) <= rel * float(e.abs().max()) + 1e-6, what


def inputs(stage, count, seed):
    maps, side, out, _ = STAGES[stage]
    torch.manual_seed(seed)
    conv = nn.Conv2d(maps, out, 5).to(memory_format=torch.channels_last)
    if stage == "first":
        x = torch.randn(count, 1, side, side) * 2
        x[:, :, :6] = -0.4242  # a flat background band: exact ties in every window there
    else:
        x = torch.sigmoid(torch.randn(count, maps, side, side) * 4)
        x[:, :, :4] = 0.5  # the sigmoid of a flat background: ties again
    x = x.contiguous(memory_format=torch.channels_last)
    pooled = (side - 4) // 2
    grad = torch.randn(count, out, pooled, pooled).contiguous(memory_format=torch.channels_last)
    return x, conv, grad


@built
@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("count", [1, 3, 16, 129])
def test_pooled_maps_and_gradients_match_pytorchs(build, stage, count):
    x, conv, grad = inputs(stage, count, seed=count)
    results = both(stage, x, conv, grad)
    assert_same(results)
    # Channels-last, as lenet trains: no copies between the stages.
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)


@built
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_contiguous_inputs_and_weights_give_the_same(stage):
    x, conv, grad = inputs(stage, 8, seed=1)
    conv = conv.to(memory_format=torch.contiguous_format)
    assert_same(both(stage, x.contiguous(), conv, grad.contiguous()))


@built
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_ties_go_to_the_first_pixel_in_row_order_as_in_pytorch(build, stage):
    # One tap: each convolution output is one input pixel, so every 2x2 block of equal pixels
    # is a window of exact ties whose pixels see different patches (the gradient of every
    # other tap, and of the input, tells which pixel won).
    maps, side, out, _ = STAGES[stage]
    conv = nn.Conv2d(maps, out, 5)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, 2, 2] = torch.arange(1.0, out + 1)
    x = torch.randn(2, maps, side, side)
    inner = side - 4
    block = torch.randn(2, 1, inner // 2, inner // 2)
    x[:, :1, 2 : side - 2, 2 : side - 2] = block.repeat_interleave(2, 2).repeat_interleave(2, 3)
    grad = torch.randn(2, out, inner // 2, inner // 2)
    expected, got = both(stage, x, conv, grad)
    # (The plain build rounds a multiply and an add where PyTorch fuses them: 1 ulp.)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
    for e, g in zip(expected[1:], got[1:]):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@built
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_nan_wins_its_window_as_in_pytorch(build, stage):
    maps, side, out, run = STAGES[stage]
    conv = nn.Conv2d(maps, out, 5)
    x = torch.randn(1, maps, side, side)
    x[0, 0, side // 2, side // 2] = float("nan")
    with torch.no_grad():
        expected = F.max_pool2d(conv(x), 2, 2)
        got = run(x, conv)
    assert torch.isnan(got).any()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))


@built
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_gradients_are_the_same_bits_every_time(stage):
    x, conv, grad = inputs(stage, 64, seed=0)
    first, second = both(stage, x, conv, grad)[1], both(stage, x, conv, grad)[1]
    for a, b in zip(first[1:], second[1:]):
        assert a is None or torch.equal(a, b)


def test_pytorchs_openmp_threads_are_found_where_pytorch_has_them():
    # The kernels share a batch among PyTorch's own threads; if the runtime were not found they
    # would quietly run on one thread, at half the speed on 2 cores.
    if stages.variant() is None or "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("no compiled kernels, or a PyTorch without OpenMP threads")
    assert stages.openmp() is not None


@pytest.fixture
def threads():
    """Sets PyTorch's thread count, which the kernels share a batch among; restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def conv1_results(x, conv, grad):
    out = stages.conv1(x.clone(), conv)
    out.backward(grad)
    return out.detach(), None, conv.weight.grad.clone(), conv.bias.grad.clone()


@built
@pytest.mark.parametrize("stage", [*sorted(STAGES), "conv1", "normalised_first", "normalised"])
def test_threads_share_a_batch_and_agree_with_one_thread(threads, stage):
    # 129 images: shares of 43 for 3 threads, 64 and 65 for 2, so an image left out or run
    # twice would show; more threads than this machine's cores work too. (The other tests
    # compare the kernels with PyTorch at PyTorch's thread count.)
    x, conv, grad = inputs(stage if stage in STAGES else "first", 129, seed=5)
    if stage == "conv1":
        grad = torch.randn(129, 6, 24, 24)
    runs = {}
    for count in (1, 2, 3):
        threads(count)
        layer = copy.deepcopy(conv)
        if stage == "conv1":
            runs[count] = conv1_results(x, layer, grad)
        elif stage == "normalised_first":
            conv, norm, x, grad = normalised_first_stage(129, seed=5)
            out, grads, running = normalised_results(x, conv, norm, grad, kernel=True)
            runs[count] = (out, None, *grads, *running)
        elif stage == "normalised":
            conv, norm, x, grad = normalised_stage(6, 12, 16, 129, seed=5)
            out, grads, running = normalised_stage_results(x, conv, norm, grad, kernel=True)
            runs[count] = (out, None, *grads, *running)
        else:
            runs[count] = both(stage, x, layer, grad)[1]
    for count in (2, 3):
        # Each image's maps and input gradient come from one thread alone: the same bits.
        for one, many in zip(runs[1][:2], runs[count][:2]):
            assert one is None or torch.equal(one, many)
        # The weight and bias gradients add up the threads' sums: another order of addition
        # (and for "normalised", PyTorch's convolution backward pass sums BatchNorm's
        # gradient, whose terms cancel: 2.7e-5 of the largest apart, measured).
        tolerance = 1e-4 if stage == "normalised" else 1e-5
        for one, many in zip(runs[1][2:], runs[count][2:]):
            scale = float(one.abs().max())
            torch.testing.assert_close(many, one, rtol=0, atol=tolerance * scale)


@built
def test_lenet_training_steps_run_through_the_kernels_and_match_pytorch(monkeypatch):
    torch.manual_seed(0)
    model = create_model("lenet").to(memory_format=torch.channels_last).train()
    twin = copy.deepcopy(model)
    x = (torch.randn(32, 1, 28, 28) * 3).contiguous(memory_format=torch.channels_last)
    calls = []
    for name in ("first", "second"):
        original = getattr(stages, name)
        monkeypatch.setattr(
            stages, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a)
        )
    got = TrainingView(model)(x)
    assert calls == ["first", "second"], "lenet's training step did not use both kernels"
    monkeypatch.setattr(stages, "enabled", False)
    expected = TrainingView(twin)(x)
    assert len(calls) == 2, "switched off, a kernel still ran"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    got.square().sum().backward()
    expected.square().sum().backward()
    for (where, p), q in zip(twin.named_parameters(), model.parameters()):
        scale = float(p.grad.abs().max())
        assert float((q.grad - p.grad).abs().max()) <= 1e-4 * scale + 1e-7, where


def test_what_the_kernels_do_not_cover_goes_to_pytorch(monkeypatch):
    monkeypatch.setattr(stages, "_kernels", object())  # as if built, whatever this machine has
    pool = nn.MaxPool2d(2, 2)
    conv1, conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
    x1, x2 = torch.randn(2, 1, 28, 28), torch.randn(2, 6, 12, 12)
    assert stages.first_covers(x1, conv1, pool) and stages.second_covers(x2, conv2, pool)
    assert stages.second_covers(x2.clone().requires_grad_(), conv2, pool)
    assert not stages.first_covers(x1.clone().requires_grad_(), conv1, pool)  # no input grad
    assert not stages.first_covers(x1.double(), conv1, pool)
    assert not stages.first_covers(torch.randn(2, 1, 32, 32), conv1, pool)
    assert not stages.first_covers(torch.randn(2, 3, 28, 28), nn.Conv2d(3, 6, 5), pool)
    assert not stages.first_covers(x1, nn.Conv2d(1, 6, 5, bias=False), pool)
    assert not stages.first_covers(x1, nn.Conv2d(1, 6, 5, padding=2), pool)
    assert not stages.second_covers(x2, conv2, nn.MaxPool2d(3, 2))
    assert not stages.second_covers(x2, conv2, nn.MaxPool2d(2, 1))
    assert not stages.second_covers(x2, nn.Conv2d(6, 8, 5), pool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not stages.first_covers(x1, conv1, pool)
        assert not stages.second_covers(x2, conv2, pool)
    # lenet-relu's first stage: BatchNorm in training, on its batch's statistics.
    relu, conv, norm = nn.ReLU(), nn.Conv2d(1, 6, 5, bias=False), nn.BatchNorm2d(6)
    assert stages.normalised_first_covers(x1, conv, norm, relu, pool)
    assert not stages.normalised_first_covers(x1, conv, norm.eval(), relu, pool)
    norm.train()
    assert not stages.normalised_first_covers(x1, conv1, norm, relu, pool)  # a bias
    assert not stages.normalised_first_covers(x1, conv, norm, nn.Sigmoid(), pool)
    assert not stages.normalised_first_covers(x1, conv, norm, relu, nn.AvgPool2d(2, 2))
    assert not stages.normalised_first_covers(x1, conv, nn.BatchNorm2d(6, affine=False), relu, pool)
    untracked = nn.BatchNorm2d(6, track_running_stats=False)
    assert not stages.normalised_first_covers(x1, conv, untracked, relu, pool)
    assert not stages.normalised_first_covers(x1.clone().requires_grad_(), conv, norm, relu, pool)
    # BatchNorm, ReLU and pooling after a convolution PyTorch runs: 8, 16, ... 64 maps of
    # even sides, no bias.
    wide = nn.Conv2d(6, 16, 5, bias=False)
    norm16 = nn.BatchNorm2d(16)
    assert stages.normalised_covers(x2, wide, norm16, relu, pool)
    assert stages.normalised_covers(x2.clone().requires_grad_(), wide, norm16, relu, pool)
    assert not stages.normalised_covers(x2, nn.Conv2d(6, 16, 5), norm16, relu, pool)
    assert not stages.normalised_covers(x2, nn.Conv2d(6, 6, 5, bias=False), norm, relu, pool)
    assert not stages.normalised_covers(
        x2, nn.Conv2d(6, 72, 5, bias=False), nn.BatchNorm2d(72), relu, pool
    )
    assert not stages.normalised_covers(torch.randn(2, 6, 13, 13), wide, norm16, relu, pool)
    assert not stages.normalised_covers(
        x2, nn.Conv2d(6, 16, 5, bias=False, padding="same"), norm16, relu, pool
    )
    assert not stages.normalised_covers(x2.double(), wide, norm16, relu, pool)
    assert not stages.normalised_covers(x2, wide, nn.BatchNorm2d(24), relu, pool)  # 16 maps
    assert not stages.normalised_covers(x2, wide, nn.BatchNorm2d(16).double(), relu, pool)
    assert not stages.normalised_covers(x2[:0], wide, norm16, relu, pool)  # no images
    assert not stages.normalised_covers(x2, wide, norm16.eval(), relu, pool)
    norm16.train()
    assert not stages.normalised_covers(x2, wide, norm16, relu, nn.MaxPool2d(3, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not stages.normalised_covers(x2, wide, norm16, relu, pool)
        assert not stages.normalised_first_covers(x1, conv, norm, relu, pool)
    # Evaluated BatchNorm folded into lenet's stages: their shapes, running statistics.
    assert stages.folded_covers(x1, conv, norm.eval(), relu, pool)
    assert stages.folded_covers(x2.clone().requires_grad_(), wide, norm16.eval(), relu, pool)
    assert not stages.folded_covers(x1.clone().requires_grad_(), conv, norm, relu, pool)
    assert not stages.folded_covers(x2, nn.Conv2d(6, 8, 5), nn.BatchNorm2d(8).eval(), relu, pool)
    untracked.eval()  # no running statistics: batch statistics even when evaluated
    assert not stages.folded_covers(x1, conv, untracked, relu, pool)
    assert not stages.folded_covers(x1, conv, norm.train(), relu, pool)
    assert not stages.folded_covers(x1, conv, norm.eval(), nn.Sigmoid(), pool)
    assert not stages.folded_covers(x1, conv, nn.BatchNorm2d(6).double().eval(), relu, pool)
    assert not stages.folded_covers(x1, conv, nn.BatchNorm2d(8).eval(), relu, pool)
    monkeypatch.setattr(stages, "enabled", False)
    assert not stages.first_covers(x1, conv1, pool)
    assert not stages.second_covers(x2, conv2, pool)
    assert not stages.normalised_first_covers(x1, conv, norm.train(), relu, pool)
    assert not stages.normalised_covers(x2, wide, norm16.train(), relu, pool)
    assert not stages.folded_covers(x1, conv, norm.eval(), relu, pool)


def test_without_the_kernels_lenet_trains_with_pytorchs(monkeypatch):
    # An install where setup.py could not build them: the same step, PyTorch's way.
    monkeypatch.setattr(stages, "_kernels", None)
    assert not stages.available() and stages.variant() is None
    torch.manual_seed(0)
    model = create_model("lenet").train()
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(TrainingView(model)(x), model(x), rtol=0, atol=1e-5)


@built
@pytest.mark.parametrize("switched_on", [True, False])
def test_the_model_card_says_whether_the_kernels_trained_it(
    small_mnist, tmp_path, monkeypatch, switched_on
):
    from lenet.config import resolve_config
    from lenet.training import train

    monkeypatch.setattr(stages, "enabled", switched_on)
    config = resolve_config(
        "lenet", epochs=1, train_limit=256, device="cpu", out=str(tmp_path / "run")
    )
    result = train(config, dataset=small_mnist, progress=False)
    assert result.card["stage_kernels"] == (stages.variant() if switched_on else None)


@built
@pytest.mark.parametrize("bias", [True, False])
def test_the_first_convolution_alone_matches_pytorchs(build, bias):
    # lenet-relu's first stage: the maps go to BatchNorm, not straight to the pooling.
    torch.manual_seed(4)
    conv = nn.Conv2d(1, 6, 5, bias=bias).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(conv)
    x = (torch.randn(37, 1, 28, 28) * 2).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(37, 6, 24, 24)
    got, expected = stages.conv1(x, conv), twin(x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    got.backward(grad)
    expected.backward(grad)
    for mine, theirs in zip(conv.parameters(), twin.parameters()):
        scale = float(theirs.grad.abs().max())
        assert float((mine.grad - theirs.grad).abs().max()) <= 1e-5 * scale


def normalised_first_stage(count, seed, momentum=0.1):
    """lenet-relu's first stage in training, with gammas of both signs (a negative one pools
    each window's smallest convolution output) and a flat band of ties in every map."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(1, 6, 5, bias=False).to(memory_format=torch.channels_last)
    norm = nn.BatchNorm2d(6, momentum=momentum).train()
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.3, -0.7, 0.4, -1.6, 0.9, -0.2]))
        norm.bias.uniform_(-0.5, 0.5)
        norm.running_mean.uniform_(-1, 1)
    x = torch.randn(count, 1, 28, 28) * 2 + 0.3
    x[:, :, :6] = -0.4242
    grad = torch.randn(count, 6, 12, 12).contiguous(memory_format=torch.channels_last)
    return conv, norm, x.contiguous(memory_format=torch.channels_last), grad


def normalised_results(x, conv, norm, grad, kernel):
    """The stage's output, the convolution's and BatchNorm's gradients, and BatchNorm's
    running statistics after two steps."""
    for _ in range(2):
        if kernel:
            out = stages.normalised_first(x, conv, norm)
        else:
            out = F.max_pool2d(F.relu(norm(conv(x))), 2, 2)
        out.backward(grad)
    grads = [conv.weight.grad, norm.weight.grad, norm.bias.grad]
    return out.detach(), [g.clone() for g in grads], [b.clone() for b in norm.buffers()]


@built
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("count", [1, 3, 129])
def test_lenet_relus_first_stage_in_training_matches_pytorchs(build, count, momentum):
    # One image alone: BatchNorm's statistics over its 576 pixels a map; None: BatchNorm's
    # cumulative average for the running statistics.
    # Against PyTorch in float64: in float32 its batch statistics were the less accurate
    # (outputs 1e-4 from float64's, the kernel's 1.4e-6: it sums in doubles).
    conv, norm, x, grad = normalised_first_stage(count, seed=count, momentum=momentum)
    assert stages.normalised_first_covers(x, conv, norm, nn.ReLU(), nn.MaxPool2d(2, 2))
    twins = copy.deepcopy(conv).double(), copy.deepcopy(norm).double()
    expected = normalised_results(x.double(), *twins, grad.double(), False)
    got = normalised_results(x, conv, norm, grad, True)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got[0].double(), expected[0], rtol=0, atol=1e-5)
    for what, mine, theirs in zip(("weight", "gamma", "beta"), got[1], expected[1]):
        scale = float(theirs.abs().max())
        assert float((mine.double() - theirs).abs().max()) <= 1e-5 * scale, what
    for mine, theirs in zip(got[2], expected[2]):
        torch.testing.assert_close(mine, theirs.to(mine.dtype), rtol=1e-6, atol=1e-7)


# (input maps, side, output maps): lenet-relu's second stage, lenet-plus's two.
NORMALISED = [(6, 12, 16), (1, 28, 16), (16, 12, 32)]


def normalised_stage(maps, side, out, count, seed):
    """A convolution without bias into ``out`` maps, then BatchNorm in training (gammas of
    both signs), ReLU and 2x2 pooling; inputs with a flat band (ties) and a gradient."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(maps, out, 5, bias=False).to(memory_format=torch.channels_last)
    norm = nn.BatchNorm2d(out).train()
    with torch.no_grad():
        norm.weight.uniform_(0.2, 1.5).mul_(torch.tensor([1.0, -1.0]).repeat(out // 2))
        norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(count, maps, side, side) + 0.3
    x[:, :, :6] = 0.25
    grad = torch.randn(count, out, (side - 4) // 2, (side - 4) // 2)
    layout = torch.channels_last
    return conv, norm, x.contiguous(memory_format=layout), grad.contiguous(memory_format=layout)


def normalised_stage_results(x, conv, norm, grad, kernel):
    """Output, input gradient, the convolution's and BatchNorm's gradients and BatchNorm's
    buffers after two steps."""
    x = x.detach().clone().requires_grad_()
    for _ in range(2):
        if kernel:
            out = stages.normalised(x, conv, norm)
        else:
            out = F.max_pool2d(F.relu(norm(conv(x))), 2, 2)
        out.backward(grad)
    grads = [x.grad, conv.weight.grad, norm.weight.grad, norm.bias.grad]
    return out.detach(), [g.clone() for g in grads], [b.clone() for b in norm.buffers()]


@built
@pytest.mark.parametrize("shape", NORMALISED, ids=str)
@pytest.mark.parametrize("count", [1, 67])
def test_batchnorm_relu_pooling_after_a_convolution_matches_pytorchs(build, shape, count):
    conv, norm, x, grad = normalised_stage(*shape, count, seed=count)
    assert stages.normalised_covers(x, conv, norm, nn.ReLU(), nn.MaxPool2d(2, 2))
    twins = copy.deepcopy(conv).double(), copy.deepcopy(norm).double()
    expected = normalised_stage_results(x.double(), *twins, grad.double(), kernel=False)
    got = normalised_stage_results(x, conv, norm, grad, kernel=True)
    assert got[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got[0].double(), expected[0], rtol=0, atol=2e-5)
    # The weight gradient is PyTorch's float32 convolution backward pass over BatchNorm's
    # gradient, which sums to zero over each map: its terms cancel, and it came 1.4e-5 (of
    # its largest) from float64's.
    tolerances = {"input": 1e-5, "weight": 1e-4, "gamma": 1e-5, "beta": 1e-5}
    for what, mine, theirs in zip(tolerances, got[1], expected[1]):
        scale = float(theirs.abs().max())
        assert float((mine.double() - theirs).abs().max()) <= tolerances[what] * scale, what
    for mine, theirs in zip(got[2], expected[2]):
        torch.testing.assert_close(mine, theirs.to(mine.dtype), rtol=1e-6, atol=1e-7)


@built
def test_the_kernels_refuse_map_counts_they_cannot_hold():
    # The Python side only calls with what normalised_covers allows; the C side checks on its
    # own before it writes anything.
    made, gamma, beta = torch.zeros(2, 8, 8, 6), torch.ones(6), torch.zeros(6)
    running_mean, running_var = torch.zeros(6), torch.ones(6)
    picked, out = torch.empty(2, 4, 4, 6), torch.empty(2, 4, 4, 6)
    winner, centre = (
        torch.empty(2, 4, 4, 6, dtype=torch.uint8),
        torch.empty(12, dtype=torch.float64),
    )
    tensors = (made, gamma, beta, running_mean, running_var, picked, winner, out, centre)
    with pytest.raises(ValueError, match="6 maps: the kernels take a multiple of 8 up to 88"):
        stages._run(stages._kernels.bn_pool_forward, *tensors, 8, 8, 6, scalars=(1e-5, 0.1))
    assert torch.equal(running_var, torch.ones(6)), "written before the check"
    with pytest.raises(ValueError, match="7x8 maps: the kernels pool even sides"):
        stages._run(stages._kernels.bn_pool_forward, *tensors, 7, 8, 8, scalars=(1e-5, 0.1))


@built
def test_lenet_relu_training_steps_use_the_first_stages_kernel_and_match_pytorch(monkeypatch):
    torch.manual_seed(0)
    model = create_model("lenet-relu").to(memory_format=torch.channels_last).train()
    twin = copy.deepcopy(model)
    x = torch.randn(32, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    calls = []
    for name in ("conv1", "normalised_first", "normalised", "folded"):
        original = getattr(stages, name)
        monkeypatch.setattr(
            stages, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a)
        )
    # Evaluated (BatchNorm on its running statistics), BatchNorm folds into lenet's kernels.
    with torch.no_grad():
        evaluated = TrainingView(model.eval())(x)
    assert calls == ["folded", "folded"]
    torch.testing.assert_close(evaluated, model(x), rtol=0, atol=1e-5)
    model.train()
    calls.clear()
    got = TrainingView(model)(x)
    assert calls == ["normalised_first", "normalised"]
    monkeypatch.setattr(stages, "enabled", False)
    expected = TrainingView(twin)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    got.square().sum().backward()
    expected.square().sum().backward()
    for (where, p), q in zip(twin.named_parameters(), model.parameters()):
        scale = float(p.grad.abs().max())
        assert float((q.grad - p.grad).abs().max()) <= 1e-4 * scale + 1e-7, where
    for (where, b), c in zip(twin.named_buffers(), model.buffers()):
        torch.testing.assert_close(c, b, msg=where)


@built
def test_lenet_plus_training_steps_use_the_kernels_and_match_pytorch(monkeypatch):
    torch.manual_seed(0)
    model = create_model("lenet-plus").to(memory_format=torch.channels_last).train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # the same outputs from both, to compare
    twin = copy.deepcopy(model)
    x = torch.randn(24, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    calls = []
    original = stages.normalised
    monkeypatch.setattr(stages, "normalised", lambda *a: calls.append(1) or original(*a))
    got = TrainingView(model)(x)
    assert len(calls) == 2, "both of lenet-plus's stages"
    monkeypatch.setattr(stages, "enabled", False)
    expected = TrainingView(twin)(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    got.square().sum().backward()
    expected.square().sum().backward()
    for (where, p), q in zip(twin.named_parameters(), model.parameters()):
        scale = float(p.grad.abs().max())
        assert float((q.grad - p.grad).abs().max()) <= 1e-4 * scale + 1e-7, where
    for (where, b), c in zip(twin.named_buffers(), model.buffers()):
        torch.testing.assert_close(c, b, msg=where)


@built
@pytest.mark.skipif(not stages.available(), reason="lenet's compiled stages are not built here")
def test_kept_folding_follows_every_change_to_the_model(monkeypatch):
    # Without autograd the folded weights are kept between batches: any change to what they
    # came from (in place, as an optimizer step or load_state_dict does, or a tensor replaced)
    # must show in the next answer, as model.forward gives it. A folding made under
    # inference_mode serves plain no_grad too.
    torch.manual_seed(5)
    model = create_model("lenet-relu").eval()
    x = torch.randn(7, 1, 28, 28)
    foldings = []
    original = stages._folding
    monkeypatch.setattr(stages, "_folding", lambda *a: foldings.append(1) or original(*a))

    def check() -> None:
        for mode in (torch.inference_mode, torch.no_grad):
            with mode():
                expected = model(x)
                foldings.clear()
                torch.testing.assert_close(TrainingView(model)(x), expected, rtol=1e-5, atol=1e-5)
                assert len(foldings) == 2  # both stages ran folded (the path under test)

    check()
    first, second = model.features[1], model.features[5]
    with torch.no_grad():
        first.running_var.mul_(3.0)  # in place: a new version of the same tensor
    check()
    with torch.no_grad():
        second.weight.neg_()
    check()
    model.features[4].weight = nn.Parameter(torch.randn(16, 6, 5, 5))  # replaced
    check()
    model.features[0].weight.data.mul_(-0.5)  # through .data: no new version
    check()
    state = {k: v + 0.1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    check()
    first.eps = 0.5
    check()
    # Training changes the running statistics in place; evaluation afterwards sees them.
    model.train()
    TrainingView(model)(x).sum().backward()
    model.eval()
    check()


def test_batchnorm_folded_for_evaluation_matches_pytorch_and_passes_gradients(monkeypatch):
    # BatchNorm on running statistics (evaluation, or training with BatchNorm frozen) is a
    # scale and a shift per map: folded into the convolution, lenet's kernels run the stage.
    # Negative gammas flip which pixel is largest: the folded maps pool the same.
    torch.manual_seed(3)
    model = create_model("lenet-relu").to(memory_format=torch.channels_last)
    with torch.no_grad():
        for norm in (model.features[1], model.features[5]):
            norm.weight.uniform_(0.3, 1.5).mul_(
                torch.tensor([1.0, -1.0]).repeat(norm.num_features // 2)
            )
            norm.bias.uniform_(-0.5, 0.5)
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    model.eval()
    twin = copy.deepcopy(model)
    x = torch.randn(29, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    calls = []
    original = stages.folded
    monkeypatch.setattr(stages, "folded", lambda *a: calls.append(1) or original(*a))
    got = TrainingView(model)(x)
    assert len(calls) == 2
    expected = twin(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    got.square().sum().backward()
    expected.square().sum().backward()
    for (where, p), q in zip(twin.named_parameters(), model.parameters()):
        scale = float(p.grad.abs().max())
        assert float((q.grad - p.grad).abs().max()) <= 1e-4 * scale + 1e-7, where
