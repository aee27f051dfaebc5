"""make_linear: NF4 is bit-identical to bitsandbytes' Linear4bit (peft's QLoRA base), dense is x @ W.T + b."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

from hotlora.server.model.quant import QUANT_CHOICES, DenseLinear, NF4Linear, make_linear

REPO_ROOT = Path(__file__).resolve().parents[1]

DTYPES = [torch.float32, torch.bfloat16]


def linear4bit(weight: torch.Tensor, bias: torch.Tensor | None, cpu_repack: bool) -> bnb.nn.Linear4bit:
    """The reference as transformers builds it for load_in_4bit (nf4, double quant, blocksize 64)."""
    out_f, in_f = weight.shape
    lin = bnb.nn.Linear4bit(
        in_f, out_f, bias=bias is not None, compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4"
    )
    lin.weight = bnb.nn.Params4bit(
        weight.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64, module=lin
    )
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    lin = lin.to("cpu").eval()  # .to() quantizes
    lin.support_avx512bf16_for_cpu = cpu_repack
    return lin


def weights(dtype: torch.dtype, out_f: int = 192, in_f: int = 128, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) * in_f**-0.5).to(dtype)
    return w, torch.randn(out_f, generator=g).to(dtype)


# cpu_repack=True is bitsandbytes' AVX512-BF16 CPU path (used by Linear4bit where the CPU has it);
# both paths are forced here so the test means the same thing on every CI machine.
@pytest.mark.parametrize("cpu_repack", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_bit_identical_to_linear4bit(dtype, with_bias, cpu_repack):
    w, b = weights(dtype)
    b = b if with_bias else None
    ref = linear4bit(w, b, cpu_repack)
    ours = make_linear(w, b, "nf4")
    ours.cpu_repack = cpu_repack
    assert torch.equal(ours.packed_weight, ref.weight.data)  # same packed storage, before any forward
    assert torch.equal(ours.quant_state.absmax, ref.weight.quant_state.absmax)
    for m in (1, 3, 17):
        x = torch.randn(m, 128, dtype=dtype)
        with torch.no_grad():
            y_ref = ref(x)
            y = ours(x)
        assert y.dtype == dtype and y.shape == (m, 192)
        assert torch.equal(y, y_ref), f"m={m}: max diff {(y - y_ref).abs().max()}"
    x3 = torch.randn(2, 5, 128, dtype=dtype)  # [batch, seq, hidden] inputs work as in Linear4bit
    with torch.no_grad():
        assert torch.equal(ours(x3), ref(x3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_within_nf4_error_of_dense(dtype):
    w, b = weights(dtype, 1536, 576)
    layer = make_linear(w, b, "nf4")
    x = torch.randn(8, 576, dtype=dtype)
    dense = torch.nn.functional.linear(x.float(), w.float(), b.float())
    with torch.no_grad():
        y = layer(x).float()
    # NF4 (4 bits, absmax per 64) on Gaussian weights: ~7% relative weight error, same on outputs
    w_err = (layer.dequantized().float() - w.float()).norm() / w.float().norm()
    assert 0.03 < w_err < 0.12
    out_err = (y - b.float() - (dense - b.float())).norm() / (dense - b.float()).norm()
    assert out_err < 0.12


def test_nf4_layout_and_state():
    w, _ = weights(torch.bfloat16, 1536, 576)
    layer = make_linear(w, None, "nf4")
    assert isinstance(layer, NF4Linear)
    assert (layer.out_features, layer.in_features) == (1536, 576)
    assert layer.packed_weight.dtype == torch.uint8 and layer.packed_weight.shape == (1536 * 576 // 2, 1)
    st = layer.quant_state
    assert st.quant_type == "nf4" and st.blocksize == 64 and st.nested and st.state2.blocksize == 256
    assert st.absmax.dtype == torch.uint8 and st.absmax.numel() == 1536 * 576 // 64
    assert tuple(st.shape) == (1536, 576) and st.dtype == torch.bfloat16
    torch.testing.assert_close(layer.dequantized(), bnbF.dequantize_4bit(layer.packed_weight, st))
    packed_before = layer.packed_weight.clone()
    layer.cpu_repack = True
    with torch.no_grad():
        layer(torch.randn(2, 576, dtype=torch.bfloat16))
    # the CPU fast path repacks a private copy: the standard layout stays for the GPU kernels
    assert torch.equal(layer.packed_weight, packed_before) and layer.quant_state.nested
    assert layer.bias is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_is_plain_linear(dtype):
    w, b = weights(dtype)
    layer = make_linear(w, b, "none")
    assert isinstance(layer, DenseLinear) and (layer.out_features, layer.in_features) == (192, 128)
    x = torch.randn(4, 128, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
    assert torch.equal(y, torch.nn.functional.linear(x, w, b))
    torch.testing.assert_close(y.float(), x.float() @ w.float().T + b.float(), atol=0.05, rtol=0.02)
    assert not any(p.requires_grad for p in layer.parameters())


def test_make_linear_rejects_bad_arguments():
    w, b = weights(torch.float32)
    assert QUANT_CHOICES == ("nf4", "none")
    with pytest.raises(ValueError, match="nf4"):
        make_linear(w, b, "int8")
    with pytest.raises(ValueError, match="2-D"):
        make_linear(w[0], None, "none")
    with pytest.raises(ValueError, match="bias"):
        make_linear(w, b[:3], "nf4")


def test_bitsandbytes_import_survives_repo_root_on_sys_path():
    """bnb does `from kernels import get_kernel`; our kernels/ folder must not break it (or stay registered)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import torch\n"
        "from hotlora.server.model.quant import make_linear\n"
        "m = make_linear(torch.randn(64, 64), None, 'nf4')\n"
        "assert m(torch.randn(2, 64)).shape == (2, 64)\n"
        "assert 'kernels' not in sys.modules, sys.modules.get('kernels')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr


def test_checkout_root_never_shadows_the_kernels_package():
    """Run from the checkout's root (`python -c` / `python -m` put the working directory first on sys.path; a Ray
    worker gets the driver's), importing hotlora.server drops that root, so a later `import kernels` (transformers
    5.25+ imports the PyPI package) cannot find the checkout's kernels/ folder."""
    code = (
        "import importlib.util, sys\n"
        "assert sys.path[0] == ''\n"
        "import hotlora.server\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec else None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() != str(REPO_ROOT / "kernels" / "__init__.py")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fused_group_matches_bitsandbytes():
    """On CUDA, NF4 layers run the fused Triton kernel on bnb-identical weights, and q/k/v fused into one
    NF4Group give each member's own output, within bf16 noise of bnb.matmul_4bit."""
    from hotlora.server.model.quant import fuse_nf4

    torch.manual_seed(0)
    weights = [torch.randn(n, 512, dtype=torch.bfloat16, device="cuda") * 0.05 for n in (512, 128, 128)]
    biases = [torch.randn(w.shape[0], dtype=torch.bfloat16, device="cuda") for w in weights]
    layers = [NF4Linear(w, b) for w, b in zip(weights, biases, strict=True)]
    assert all(layer.fused is not None and layer.packed_weight is None for layer in layers)
    x = torch.randn(24, 512, dtype=torch.bfloat16, device="cuda")
    singles = [layer(x) for layer in layers]
    group = fuse_nf4(layers)
    assert group is not None
    for y, single, layer, w, b in zip(group(x), singles, layers, weights, biases, strict=True):
        packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(layer.dequantized(), bnbF.dequantize_4bit(packed, state))
        want = bnb.matmul_4bit(x, packed, bias=b, quant_state=state).float()
        assert ((y.float() - want).norm() / want.norm()).item() < 1e-2
        assert torch.equal(y, single)
