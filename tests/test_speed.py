"""Speed helpers keep the numbers: bf16 autocast, bf16 weights and fp32 master weights stay close to fp32
(bf16 tolerances); the CPU attention and LayerNorm fast paths match float64 references; CPU flag detection
reads a hand-written /proc/cpuinfo. No timings here (those are in benchmarks/)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clipforge
from clipforge.losses import clip_loss
from clipforge.models.attention import attention, explicit_attention
from clipforge.models.layers import LayerNorm
from clipforge.speed import (
    MasterWeights,
    autocast,
    bf16_inference,
    cast_matmul_weights,
    channels_last,
    channels_last_input,
    compile_model,
    cpu_description,
    cpu_supports_bf16,
    int8_pair_sums_saturate,
    resolve_precision,
)

CAPTIONS = ["a red circle on the left", "two small green hearts and a blue star at the top", "x"]


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=gen)
    tokens = clipforge.get_tokenizer("ViT-Micro-8-32")(CAPTIONS)
    return images, tokens


def features(model, images, tokens):
    with torch.no_grad():
        img, txt, _ = model(images, tokens)
    return img.float(), txt.float()


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Unit-norm features through a few bf16 layers: entries within 0.02 and cosine above 0.999 per row."""
    assert not torch.equal(got, want), "the low-precision path was not taken"
    assert (got - want).abs().max().item() < 0.02
    assert F.cosine_similarity(got, want, dim=-1).min().item() > 0.999


def test_cpu_bf16_detection_reads_cpuinfo_flags(tmp_path):
    with_bf16 = tmp_path / "a"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n\n")
    without = tmp_path / "b"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\n")
    arm = tmp_path / "c"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_supports_bf16(str(with_bf16))
    assert not cpu_supports_bf16(str(without))
    assert cpu_supports_bf16(str(arm))
    assert not cpu_supports_bf16(str(tmp_path / "missing"))


def test_cpu_description_names_model_and_kernel_flags(tmp_path):
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480C\n"
                   "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8 fma\n\n")
    assert cpu_description(str(amx)) == ("Intel(R) Xeon(R) Platinum 8480C "
                                         "[avx2 avx512f avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8]")
    old = tmp_path / "old"
    old.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2\n\n")
    assert cpu_description(str(old)) == "AMD EPYC [no AVX2/AVX-512/AMX flags]"


def test_int8_saturation_needs_x86_without_vnni_or_amx(tmp_path):
    """ONNX Runtime's int8 MatMul sums pairs of u8 x s8 products in int16 only on x86 without VNNI/AMX."""
    cases = {"fpu sse2 avx avx2 fma": True,  # AVX2 only (the AMD EPYC without AVX-512 seen here)
             "fpu avx2 avx512f avx512bw": True,  # AVX-512 without VNNI (Skylake-SP)
             "fpu avx2 avx512f avx512_vnni avx512_bf16": False,  # the AMD EPYC with AVX-512 bf16
             "fpu avx2 avx_vnni": False,
             "fpu avx2 avx512f amx_bf16 amx_int8 amx_tile": False}  # the Intel Xeon with AMX
    for i, (flags, saturates) in enumerate(cases.items()):
        cpuinfo = tmp_path / f"x86-{i}"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\n")
        assert int8_pair_sums_saturate(str(cpuinfo)) is saturates, flags
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n")
    assert not int8_pair_sums_saturate(str(arm))
    assert not int8_pair_sums_saturate(str(tmp_path / "missing"))


def test_precision_names():
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == ("bf16" if cpu_supports_bf16() else "fp32")
    with pytest.raises(ValueError, match="precision: expected one of fp32, bf16, bf16-master, got 'fp16'"):
        resolve_precision("fp16", "cpu")
    with autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")


def test_autocast_features_close_to_fp32(micro_model, batch):
    want = features(micro_model, *batch)
    with autocast("cpu", "bf16"):
        got = features(micro_model, *batch)
    for g, w in zip(got, want):
        assert_bf16_close(g, w)


def test_bf16_weights_inference_close_to_fp32(micro_model, batch):
    want = features(micro_model, *batch)
    model = bf16_inference(copy.deepcopy(micro_model))
    assert model.dtype == torch.bfloat16
    assert model.visual.conv1.weight.dtype == torch.bfloat16
    assert model.transformer.resblocks[0].attn.in_proj_weight.dtype == torch.bfloat16
    for kept in (model.ln_final.weight, model.token_embedding.weight, model.positional_embedding,
                 model.visual.class_embedding, model.logit_scale):
        assert kept.dtype == torch.float32
    got = features(model, *batch)
    for g, w in zip(got, want):
        assert_bf16_close(g, w)


def test_master_weights_step(micro_model, batch):
    images, tokens = batch
    reference = copy.deepcopy(micro_model).train()
    loss_ref = clip_loss(*reference(images, tokens))
    loss_ref.backward()

    mw = MasterWeights(copy.deepcopy(micro_model).train())
    assert list(mw.master.state_dict()) == list(micro_model.state_dict())
    assert all(p.dtype == torch.float32 for p in mw.master.parameters())
    assert mw.master.logit_scale is mw.model.logit_scale  # fp32 parameters are shared, not copied
    img, txt, scale = mw.model(images, tokens)
    loss = clip_loss(img.float(), txt.float(), scale.float())
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-2)
    loss.backward()
    mw.grads_to_master()
    ref_params = dict(reference.named_parameters())
    for name, param in mw.master.named_parameters():
        want = ref_params[name].grad
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        error = (param.grad - want).norm() / want.norm().clamp_min(1e-12)
        assert error.item() < 0.05, f"{name}: relative gradient error {error.item():.3f}"

    optimizer = torch.optim.SGD(mw.master.parameters(), lr=0.5)
    optimizer.step()
    mw.master_to_model()
    masters = dict(mw.master.named_parameters())
    for name, param in mw.model.named_parameters():
        torch.testing.assert_close(param, masters[name].to(param.dtype), rtol=0, atol=0)  # exact rounding


def _attention_float64(q, k, v, causal):
    """Reference: softmax by hand in float64 with an explicit -inf upper triangle."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    if causal:
        length = q.shape[-2]
        scores = scores + torch.full((length, length), float("-inf"), dtype=torch.float64).triu(1)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bhij,bhjd->bhid", weights, v)


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_attention_matches_float64_reference(causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=gen) for _ in range(3))
    want = _attention_float64(q, k, v, causal)
    torch.testing.assert_close(explicit_attention(q, k, v, causal).double(), want, rtol=0, atol=1e-6)
    low = [t.bfloat16() for t in (q, k, v)]
    got = attention(*low, causal)  # the CPU bf16 path
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, explicit_attention(*low, causal), rtol=0, atol=0)
    assert (got.double() - _attention_float64(*low, causal)).abs().max().item() < 2e-2
    # fp32 keeps PyTorch's fused kernel.
    torch.testing.assert_close(attention(q, k, v, causal), F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                               rtol=0, atol=0)


def test_layernorm_on_bf16_input_matches_float64(micro_model):
    gen = torch.Generator().manual_seed(0)
    norm = LayerNorm(24)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=gen))
        norm.bias.copy_(torch.randn(24, generator=gen))
    x = (3 + 2 * torch.randn(5, 7, 24, generator=gen)).bfloat16()
    xd = x.double()
    want = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
    want = want * norm.weight.double() + norm.bias.double()
    plain = norm(x)
    with torch.autocast("cpu", torch.bfloat16):
        under_autocast = norm(x)
    for out in (plain, under_autocast):
        assert out.dtype == torch.bfloat16  # normalised in fp32, returned in the activations' dtype
        assert ((out.double() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()  # one bf16 rounding


def test_channels_last_only_for_convolutional_towers(micro_model):
    assert not channels_last(micro_model)  # a ViT: patch embedding only
    assert micro_model.visual.conv1.weight.is_contiguous()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    images = torch.randn(2, 3, 16, 16)
    want = net(images)
    assert channels_last(net)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    got = net(channels_last_input(images))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compile_disabled_returns_the_model(micro_model):
    assert compile_model(micro_model, enabled=False) is micro_model


@pytest.mark.slow
def test_compiled_model_matches_eager(micro_model, batch):
    images = batch[0]
    want = micro_model.encode_image(images)
    compiled = compile_model(micro_model.visual)
    with torch.no_grad():
        got = compiled(images)
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-4)


def _full_tower(blocks, x, causal):
    """Every block on every token (the plain definition), for comparison with the pooled last block."""
    for block in blocks:
        x = block(x, causal=causal)
    return x


def test_pooled_last_block_equals_the_full_towers(micro_model, batch):
    """encode_image/encode_text compute the last block at the pooled token only; the result must equal
    running every block on every token and pooling afterwards."""
    images, tokens = batch
    m, v = micro_model, micro_model.visual
    with torch.no_grad():
        x = v.conv1(images).flatten(2).transpose(1, 2)  # [B, G*G, W]
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = _full_tower(v.transformer.resblocks, v.ln_pre(x), causal=False)
        want_image = v.ln_post(x[:, 0]) @ v.proj
        garbage = tokens.clone()
        garbage[0, int(tokens[0].argmax()) + 1:] = 4242  # after the end-of-text token: must not matter
        t = _full_tower(m.transformer.resblocks, m.token_embedding(tokens) + m.positional_embedding, causal=True)
        want_text = m.ln_final(t)[torch.arange(3), tokens.argmax(-1)] @ m.text_projection
        torch.testing.assert_close(m.encode_image(images), want_image, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.encode_text(tokens), want_text, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.encode_text(garbage), want_text, rtol=1e-5, atol=1e-5)


def test_grad_checkpointing_gives_the_same_gradients(micro_model, batch):
    images, tokens = batch
    grads = []
    for enable in (False, True):
        model = copy.deepcopy(micro_model).train()
        model.set_grad_checkpointing(enable)
        clip_loss(*model(images, tokens)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("size", [32, 37])  # 37: a remainder the convolution drops
def test_patch_embedding_matmul_equals_the_strided_convolution(micro_model, size):
    visual = micro_model.visual
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    want = F.conv2d(images.double(), visual.conv1.weight.double(), stride=visual.patch_size)  # [B, W, G, G]
    got = visual.embed_patches(images)
    torch.testing.assert_close(got.double(), want.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_packed_linear_weights_compute_the_linear_layer_and_step_aside_when_they_cannot(micro_model, batch):
    """Packed weights (`layers.pack_linear_weights`, what bf16_inference does on an AMX CPU) give each linear
    layer's output as F.linear does, to bf16 rounding; a weight changed after packing, a deep copy and a forward
    that records gradients all compute with F.linear again, exactly."""
    from clipforge.models import layers

    model = cast_matmul_weights(copy.deepcopy(micro_model)).eval()
    block = model.transformer.resblocks[0]
    fc = block.mlp.c_fc
    x = torch.randn(5, 9, fc.in_features, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        want_fc = F.linear(x, fc.weight, fc.bias)
        want_qkv = F.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias)
        want = features(model, *batch)
    count = layers.pack_linear_weights(model)
    oneDNN_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    n_layers = len(model.transformer.resblocks) + len(model.visual.transformer.resblocks)
    assert count == (4 * n_layers if oneDNN_bf16 else 0)  # c_fc, c_proj, out_proj, in_proj per block
    with torch.no_grad():
        got_fc = fc(x)
        got_qkv = layers.linear(x, block.attn.in_proj_weight, block.attn.in_proj_bias)
        got = features(model, *batch)
    for g, w in ((got_fc, want_fc), (got_qkv, want_qkv)):
        assert g.shape == w.shape and g.dtype == torch.bfloat16
        assert (g.float() - w.float()).abs().max().item() <= 0.02 * w.float().abs().max().item()
    for g, w in zip(got, want):
        assert F.cosine_similarity(g, w, dim=-1).min().item() > 0.9999
    copied = copy.deepcopy(model)  # new parameters: not packed, and the copy must not fail on the packed tensors
    with torch.no_grad():
        assert torch.equal(copied.transformer.resblocks[0].mlp.c_fc(x), want_fc)
        fc.weight.mul_(2.0)  # changed after packing: the packed copy is stale and must not be used
        assert torch.equal(fc(x), F.linear(x, fc.weight, fc.bias))
    xg = x.clone().requires_grad_()  # a forward that records gradients: F.linear itself, and a gradient
    qkv = layers.linear(xg, block.attn.in_proj_weight, block.attn.in_proj_bias)
    assert torch.equal(qkv.detach(), want_qkv)
    qkv.float().sum().backward()
    assert xg.grad is not None and block.attn.in_proj_weight.grad is not None


@pytest.mark.slow
def test_a_model_with_packed_weights_compiles_to_one_graph_that_matches_eager(micro_model, batch):
    """torch.compile of a bf16_inference model whose weights were packed (AMX CPUs): Inductor once failed to lower
    oneDNN's call on a blocked weight; the compiled model must trace in one graph and give eager's features."""
    from clipforge.models import layers

    model = cast_matmul_weights(copy.deepcopy(micro_model)).eval()
    layers.pack_linear_weights(model)  # 0 where oneDNN has no bf16 kernels: then this checks F.linear's path
    images = batch[0]
    torch._dynamo.reset()
    with torch.no_grad():
        want = model.encode_image(images)
        assert torch._dynamo.explain(model.encode_image)(images).graph_break_count == 0
        got = torch.compile(model.encode_image)(images)
    assert got.shape == want.shape
    assert F.cosine_similarity(got.float(), want.float(), dim=-1).min().item() > 0.999


def test_bf16_inference_packs_only_where_it_was_measured_to_win(monkeypatch, micro_model):
    from clipforge import speed
    from clipforge.models import layers

    oneDNN_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for flags, expect in (("avx512f avx512_bf16 amx_tile amx_bf16", True), ("avx512f avx512_bf16", False)):
        monkeypatch.setattr(speed, "cpu_flags", lambda cpuinfo="/proc/cpuinfo", flags=flags: set(flags.split()))
        assert speed.packed_weights_win() == (expect and oneDNN_bf16)
        model = bf16_inference(copy.deepcopy(micro_model))
        weight = model.transformer.resblocks[0].mlp.c_fc.weight
        assert (id(weight) in layers._PACKED) == (expect and oneDNN_bf16)
