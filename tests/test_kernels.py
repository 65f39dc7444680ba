"""The hand-written element-wise autograd functions equal their written-out formulas, forward and backward, eager and
compiled (``compiled=True``: the torch.compile'd kernels of ``model.compile_elementwise``)."""
import pytest
import torch
import torch.nn.functional as F

from megannm.model import kernels
from megannm.model.attention import apply_rotary, rotary

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _grads(fn, inputs, weight):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weight))
    loss.backward()
    return outs, [t.grad for t in inputs]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_qkv_equals_rotate_half_on_split_heads(dtype, compiled):
    g = torch.Generator().manual_seed(0)
    b, s, h, hkv, hd = 2, 7, 4, 2, 8
    qkv = torch.randn(b, s, h + 2 * hkv, hd, generator=g).to(dtype)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2], [5, 6, 7, 8, 9, 10, 11]])
    cos, sin = rotary(pos, hd, 10000.0, torch.float32)
    weight = [torch.randn(b, n, s, hd, generator=g) for n in (h, hkv, hkv)]

    def written_out(x):
        t = x.transpose(1, 2)
        return apply_rotary(t[:, :h], cos, sin), apply_rotary(t[:, h:h + hkv], cos, sin), t[:, h + hkv:]

    got, (dgot,) = _grads(lambda x: kernels.rotary_qkv(x, cos, sin, h, hkv, compiled), [qkv], weight)
    ref, (dref,) = _grads(written_out, [qkv], weight)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and a.dtype == dtype
        torch.testing.assert_close(a, r, **TOL[dtype])
    torch.testing.assert_close(dgot, dref, **TOL[dtype])
    # a gradient for v alone (q and k unused) still fills q and k with zeros
    x = qkv.detach().clone().requires_grad_()
    kernels.rotary_qkv(x, cos, sin, h, hkv, compiled)[2].float().sum().backward()
    assert float(x.grad[:, :, :h + hkv].abs().sum()) == 0 and bool((x.grad[:, :, h + hkv:] == 1).all())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_silu_gate_times_up(dtype, compiled):
    g = torch.Generator().manual_seed(1)
    for rows in (9, 5):  # a second row count: MoT's per-modality slices change size from one micro-batch to the next
        x = (2 * torch.randn(rows, 12, generator=g)).to(dtype)
        w = [torch.randn(rows, 6, generator=g)]
        got, (dgot,) = _grads(lambda t: kernels.swiglu(t, compiled), [x], w)
        ref, (dref,) = _grads(lambda t: F.silu(t[:, :6]) * t[:, 6:], [x], w)
        assert got[0].dtype == dtype and dgot.dtype == dtype
        torch.testing.assert_close(got[0], ref[0], **TOL[dtype])
        torch.testing.assert_close(dgot, dref, **TOL[dtype])
    assert kernels.swiglu(torch.zeros(0, 12, dtype=dtype), compiled).shape == (0, 6)


F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64


# compiled: one dtype pair per precision (the same expression; each pair is one more compile)
@pytest.mark.parametrize("x_dtype,w_dtype,compiled", [(F32, F32, False), (BF16, BF16, False), (BF16, F32, False),
                                                      (F64, F64, False), (F32, F32, True), (BF16, BF16, True)])
def test_rms_norm_forward_and_backward_equal_the_formula(x_dtype, w_dtype, compiled):
    g = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(4, 5, 16, generator=g)).to(x_dtype)
    weight = (1 + torch.randn(16, generator=g)).to(w_dtype)
    up = [torch.randn(4, 5, 16, generator=g)]

    def formula(t, w):
        tf = t.float() if t.dtype != torch.float64 else t
        return w * (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(t.dtype)

    got, (dx, dw) = _grads(lambda t, w: kernels.rms_norm(t, w, 1e-5, compiled), [x, weight], up)
    ref, (rx, rw) = _grads(formula, [x, weight], up)
    assert got[0].dtype == ref[0].dtype and dx.dtype == x_dtype and dw.dtype == w_dtype
    tol = TOL[torch.bfloat16 if torch.bfloat16 in (x_dtype, w_dtype) else x_dtype]
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(dx, rx, **tol)
    torch.testing.assert_close(dw, rw, **tol)
    # float64: the closed-form backward is exact, the check autograd itself can make
    if x_dtype == torch.float64 and not compiled:
        assert torch.autograd.gradcheck(lambda t, w: kernels.rms_norm(t, w, 1e-5),
                                        (x[:2, :2].clone().requires_grad_(), weight.clone().requires_grad_()))


def test_compiled_kernels_without_a_compiler_fail_with_one_line_naming_the_switch(tmp_path):
    """A machine where Inductor cannot build (here: no C++ compiler) gets the recipe key to turn off, not a
    compiler traceback."""
    import os
    import subprocess
    import sys
    code = ("import torch\nfrom megannm.model import kernels\n"
            "try:\n    kernels.swiglu(torch.randn(4, 8), compiled=True)\n"
            "except RuntimeError as e:\n    print('ERROR', e)\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300).stdout
    line = next(x for x in out.splitlines() if x.startswith("ERROR"))
    assert "model.compile_elementwise" in line and "_swiglu_forward" in line and "C++ compiler" in line


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_equals_split_norm_and_concatenate(dtype, compiled):
    """QK-norm in the fused q/k/v layout: each query and key head RMS-normalised over hd with its weight, values
    untouched; gradients of the input and of both weights as the written-out form's."""
    g = torch.Generator().manual_seed(3)
    h, hkv, hd = 4, 2, 8
    wq, wk = (1 + torch.randn(hd, generator=g)).to(dtype), (1 + torch.randn(hd, generator=g)).to(dtype)

    def written_out(x, wq, wk):
        q, k, v = x.split([h * hd, hkv * hd, hkv * hd], dim=-1)
        norm = (lambda t, w: w * (t.float() * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + 1e-5))
                .to(t.dtype))
        return torch.cat([norm(q.unflatten(-1, (h, hd)), wq).flatten(1),
                          norm(k.unflatten(-1, (hkv, hd)), wk).flatten(1), v], dim=-1)

    for rows in (7, 3):
        x = (3 * torch.randn(rows, (h + 2 * hkv) * hd, generator=g)).to(dtype)
        up = [torch.randn(rows, (h + 2 * hkv) * hd, generator=g)]
        got, dgot = _grads(lambda t, a, b: kernels.qk_norm(t, a, b, h, hkv, 1e-5, compiled), [x, wq, wk], up)
        ref, dref = _grads(written_out, [x, wq, wk], up)
        assert got[0].dtype == dtype and got[0].shape == x.shape
        torch.testing.assert_close(got[0], ref[0], **TOL[dtype])
        for a, r in zip(dgot, dref):
            assert a.dtype == dtype
            torch.testing.assert_close(a, r, **TOL[dtype])
        assert torch.equal(got[0][:, (h + hkv) * hd:], x[:, (h + hkv) * hd:])  # values exactly as they were
    assert kernels.qk_norm(torch.zeros(0, (h + 2 * hkv) * hd, dtype=dtype), wq, wk, h, hkv, 1e-5,
                           compiled).shape == (0, (h + 2 * hkv) * hd)
