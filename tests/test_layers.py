"""Layers that keep less for backward (ldm_sce/layers.py) and decoder checkpointing: the same gradients as
the plain computation, fewer saved tensors."""

import pytest
import torch
import torch.nn.functional as F

from ldm_sce import load_model


@pytest.fixture
def model(tiny_ckpts):
    _, path, preset = tiny_ckpts["sd1"]
    return load_model(path, config=preset)


def inputs(model, b=2, hw=(8, 12)):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, 4, *hw, generator=g),
        torch.tensor([10, 600][:b]),
        torch.randn(b, 77, model.cfg.unet.context_dim, generator=g),
    )


def randomize(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05


def test_decoder_checkpointing_same_gradients_fewer_saved_tensors(model):
    x, t, c = inputs(model)
    unet = model.model.diffusion_model
    tuners = unet.attach_sc_tuners()
    for tuner in tuners:
        randomize(tuner, seed=6)
    params = list(unet.tuners.parameters())
    for p in params:
        p.requires_grad_(True)
    grads, saved = {}, {}
    for flag in (False, True):
        unet.checkpoint_decoder = flag
        count = [0]

        def pack(tensor, count=count):
            count[0] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = unet(x, t, c).square().mean()
        grads[flag] = torch.autograd.grad(loss, params)
        saved[flag] = count[0]
    for a, b in zip(grads[False], grads[True], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert saved[True] < saved[False] / 3, saved


@pytest.mark.parametrize("stride,padding,k", [(1, 1, 3), (2, 1, 3), (1, 0, 1)])
def test_frozen_conv_same_input_gradient_without_keeping_the_input(stride, padding, k):
    from ldm_sce.layers import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(16, 24, k, stride=stride, padding=padding).requires_grad_(False)
    x = torch.randn(2, 16, 9, 10, requires_grad=True)
    g = torch.randn_like(F.conv2d(x, conv.weight, conv.bias, stride, padding))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = conv(x)
    assert all(t.data_ptr() != x.data_ptr() for t in saved) and len(saved) == 1  # the weight only
    ref = F.conv2d(x, conv.weight, conv.bias, stride, padding)
    assert torch.equal(y, ref)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=1e-6, atol=1e-6)
    conv.requires_grad_(True)  # trainable: the plain path, weight gradients available
    (gw,) = torch.autograd.grad(conv(x), conv.weight, g)
    assert gw.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_fp32_conv_under_autocast_has_autocasts_input_gradient(dtype):
    """fp32 frozen weights under fp16/bf16 autocast (the trainer's default on a GPU: `precision: fp16`, the
    base in fp32): the forward and the input gradient are plain autocast's, bitwise; the gradient has the
    activations' dtype (backward runs outside the autocast region, so the weight is cast there too)."""
    from ldm_sce.layers import Conv2d

    torch.manual_seed(0)
    conv = Conv2d(16, 24, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 16, 9, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = conv(x)
        ref = F.conv2d(x, conv.weight, conv.bias, 1, 1)
    g = torch.randn(y.shape).to(dtype)
    assert y.dtype == ref.dtype == dtype and torch.equal(y, ref)
    ours, theirs = torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0]
    assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs)


def test_geglu_same_gradients_keeping_one_tensor():
    from ldm_sce.layers import geglu

    h = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = geglu(h)
    assert len(saved) == 1
    a, b = h.chunk(2, dim=-1)
    torch.testing.assert_close(y, a * F.gelu(b))
    assert torch.autograd.gradcheck(geglu, (h,))


def _saved_bytes(fn, x, module):
    """fn(x) and the bytes it keeps for backward, the module's own weights not counted."""
    storages, weights = {}, {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return y, sum(storages.values())


def test_frozen_resblock_and_feedforward_keep_less_same_gradients():
    """GroupNorm + SiLU and the GEGLU projection are rerun in backward when frozen: same outputs and input
    gradients as the plain layers, less kept; trainable: the plain path, with weight gradients."""
    from ldm_sce.attention import FeedForward
    from ldm_sce.unet import ResBlock

    torch.manual_seed(0)
    block, ff = ResBlock(64, 32, 96).requires_grad_(False), FeedForward(64).requires_grad_(False)
    for m in block.modules():  # non-trivial norms and a non-zero output conv
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.Conv2d)):
            torch.nn.init.normal_(m.weight, 1.0 if isinstance(m, torch.nn.GroupNorm) else 0.05)
    emb = torch.randn(2, 32)

    def plain_block(x):
        h = block.in_layers[2](F.silu(block.in_layers[0](x))) + block.emb_layers(emb)[:, :, None, None]
        return block.skip_connection(x) + block.out_layers[3](F.silu(block.out_layers[0](h)))

    def plain_ff(x):
        a, b = ff.net[0].proj(x).chunk(2, dim=-1)
        return ff.net[2](a * F.gelu(b))

    cases = [
        (lambda x: block(x, emb), plain_block, torch.randn(2, 64, 12, 12), block, 0.55),
        (ff, plain_ff, torch.randn(2, 50, 64), ff, 0.2),
    ]
    for ours, plain, x, module, ratio in cases:
        x.requires_grad_(True)
        y, kept = _saved_bytes(ours, x, module)
        y_ref, kept_ref = _saved_bytes(plain, x, module)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
        g = torch.randn_like(y)
        torch.testing.assert_close(
            torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0], rtol=1e-5, atol=1e-6
        )
        assert kept < ratio * kept_ref, (kept, kept_ref)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the rerun in backward is under the same autocast
            y, y_ref = ours(x), plain(x)
        assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
        torch.testing.assert_close(
            torch.autograd.grad(y, x, g.bfloat16())[0], torch.autograd.grad(y_ref, x, g.bfloat16())[0], rtol=0, atol=0
        )
    ff.requires_grad_(True)
    ff(torch.randn(2, 5, 64, requires_grad=True)).sum().backward()
    assert ff.net[0].proj.weight.grad.abs().sum() > 0
