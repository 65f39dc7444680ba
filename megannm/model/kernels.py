"""The block's element-wise steps, each ONE autograd function with a hand-written backward: RoPE on the fused
q/k/v GEMM output, SwiGLU on the fused gate/up output, RMSNorm, and the QK-norm inside the fused q/k/v output.

Why: written as plain tensor expressions, autograd keeps every intermediate and runs one kernel per node both ways.
Measured on the training step (``tools/bench/step.py``'s shape, 2 CPU threads) the written-out forms spent more time
on concatenations, zero-filled slice gradients and their sums than on the arithmetic: RoPE's ``rotate_half`` is a
negation and a concatenation forward and a split and a concatenation backward, the q/k/v (gate/up) split is a
zero-filled gradient per part plus their sum (or a concatenation), and RMSNorm's composite backward takes about a
dozen passes. Here each step reads its input once or twice, writes its output into one buffer, and the backward
writes the gradient of the fused GEMM output into ONE tensor in place, part by part.

They are torch code (any device, any dtype: the same arithmetic on a GPU; NVIDIA apex's fused RMSNorm is still
preferred there when installed, ``mot.RMSNorm``) and equal the written-out forms to rounding: tests/test_model.py
checks logits and every gradient against a plain-torch reference of the whole model, and tests/test_kernels.py each
function against its formula, forward and backward, in fp32 and bf16.

``compiled=True`` (the recipe's ``model.compile_elementwise``) runs each forward and backward as ONE generated kernel
instead: the same formulas written as pure tensor expressions and handed to ``torch.compile`` (Inductor: C++ with
OpenMP on the CPU, Triton on a GPU), so a SwiGLU backward, say, reads gate, up and the gradient once and writes both
halves in one pass where the eager form takes four. It pays where the step is bound by memory passes rather than
GEMMs and costs a compile on the first micro-batch of each shape (seconds; Inductor caches it on disk for the next
run); ``tools/bench/step.py`` measures both. Empty slices (a modality absent from a micro-batch) take the eager form.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["rotary_qkv", "swiglu", "rms_norm", "qk_norm"]


@functools.cache
def _compile_kernel(fn):
    """``fn`` compiled once per process (static shapes, except what ``_any_rows`` marks); a machine where Inductor
    cannot build (no C++ compiler on a CPU, no Triton on a GPU) gets one line naming the switch."""
    kernel = torch.compile(fn, fullgraph=True)

    def run(*args):
        try:
            return kernel(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            cause = str(e.__cause__ or e).strip().splitlines()
            raise RuntimeError(f"model.compile_elementwise: torch.compile could not build the {fn.__name__} kernel "
                               f"({cause[0] if cause else type(e).__name__}); set model.compile_elementwise: false "
                               f"or install what Inductor needs") from e
    return run


def _any_rows(*ts: torch.Tensor) -> None:
    """Compile for any number of rows: MoT's tokens per modality change from one micro-batch to the next (a kernel
    generated for symbolic rows was measured as fast as a row-specialised one); the other sizes stay static."""
    for t in ts:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def _use_compiled(compiled: bool, x: torch.Tensor) -> bool:
    return compiled and x.numel() > 0


# ---------------------------------------------------------------------------------------------------------------------
# RoPE on the fused projection


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """out = x * cos + sign * rotate_half(x) * sin over the last dimension (halves x1, x2; Hugging Face Llama's form),
    with cos/sin the half tables: out1 = x1 c - s x2 sign, out2 = x2 c + s x1 sign. sign -1 is the transpose
    (the backward). Four kernels over half the data each, no temporaries."""
    half = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=sign)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """``_rotate_into`` as one expression (the compiled form)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin], dim=-1)


def _rotary_forward(qkv, cos, sin, n_qk: int):
    return _rotated(qkv[:, :, :n_qk], cos, sin, 1.0)


def _rotary_backward(dq, dk, dv, cos, sin):
    """[B, H, S, hd] gradients of q, k, v -> the [B, S, Hq + 2 Hkv, hd] gradient of the fused output."""
    return torch.cat([_rotated(dq.transpose(1, 2), cos, sin, -1.0), _rotated(dk.transpose(1, 2), cos, sin, -1.0),
                      dv.transpose(1, 2)], dim=2)


class _RotaryQKV(torch.autograd.Function):
    """qkv [B, S, Hq + 2 Hkv, hd] (the fused GEMM's output in sequence order) -> q [B, Hq, S, hd] and k [B, Hkv, S, hd]
    rotated, v [B, Hkv, S, hd] a view of the input; cos/sin [B, S, 1, hd / 2] in the activations' dtype."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, heads: int, kv_heads: int, compiled: bool):
        ctx.save_for_backward(cos, sin)
        ctx.heads, ctx.kv_heads = heads, kv_heads
        ctx.compiled = _use_compiled(compiled, qkv)
        n_qk = heads + kv_heads
        if ctx.compiled:
            qk = _compile_kernel(_rotary_forward)(qkv, cos, sin, n_qk)
        else:
            qk = qkv.new_empty(qkv.shape[:2] + (n_qk, qkv.shape[-1]))
            _rotate_into(qk, qkv[:, :, :n_qk], cos, sin, 1.0)
        qk = qk.transpose(1, 2)  # [B, H, S, hd] views; SDPA reads any strides
        return qk[:, :heads], qk[:, heads:], qkv[:, :, n_qk:].transpose(1, 2)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        h, hkv = ctx.heads, ctx.kv_heads
        if ctx.compiled and dq is not None and dk is not None and dv is not None:
            return _compile_kernel(_rotary_backward)(dq, dk, dv, cos, sin), None, None, None, None, None
        ref = next(g for g in (dq, dk, dv) if g is not None)
        b, s, hd = ref.shape[0], ref.shape[2], ref.shape[3]
        grad = ref.new_empty(b, s, h + 2 * hkv, hd)
        for g, lo, hi, rotated in ((dq, 0, h, True), (dk, h, h + hkv, True), (dv, h + hkv, h + 2 * hkv, False)):
            part = grad[:, :, lo:hi]
            if g is None:
                part.zero_()
            elif rotated:
                _rotate_into(part, g.transpose(1, 2), cos, sin, -1.0)
            else:
                part.copy_(g.transpose(1, 2))
        return grad, None, None, None, None, None


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
               compiled: bool = False):
    """RoPE on the queries and keys of a fused projection: ``qkv`` [B, S, Hq + 2 Hkv, hd]; ``cos``/``sin``
    [B, S, hd] as ``attention.rotary`` makes them (both halves equal). Returns q, k, v as [B, H, S, hd]."""
    half = qkv.shape[-1] // 2
    cos, sin = cos[..., None, :half].to(qkv.dtype), sin[..., None, :half].to(qkv.dtype)
    return _RotaryQKV.apply(qkv, cos, sin, heads, kv_heads, compiled)


# ---------------------------------------------------------------------------------------------------------------------
# SwiGLU on the fused gate/up projection


def _swiglu_forward(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_backward(gate_up, grad):
    """silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g): recomputed in the kernel, so only the input is kept."""
    gate, up = gate_up.chunk(2, dim=-1)
    s = torch.sigmoid(gate.float())
    g = grad.float()
    return torch.cat([g * up * s * (1 + gate * (1 - s)), g * gate * s], dim=-1).to(gate_up.dtype)


class _SwiGLU(torch.autograd.Function):
    """[N, 2F] = [gate | up] -> silu(gate) * up [N, F]; the backward writes d gate and d up into one [N, 2F]
    gradient (no concatenation). Keeps what the written-out form keeps (the input and silu(gate)): recomputing
    silu in the backward was measured slower than the memory it saves."""

    @staticmethod
    def forward(ctx, gate_up, compiled: bool):
        ctx.compiled = _use_compiled(compiled, gate_up)
        if ctx.compiled:
            ctx.save_for_backward(gate_up)
            _any_rows(gate_up)
            return _compile_kernel(_swiglu_forward)(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    def backward(ctx, grad):
        if ctx.compiled:
            _any_rows(ctx.saved_tensors[0], grad)
            return _compile_kernel(_swiglu_backward)(ctx.saved_tensors[0], grad), None
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)  # grad * up * silu'(gate)
        torch.mul(grad, act, out=d_up)
        return out, None


def swiglu(gate_up: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """silu(gate) * up for ``gate_up`` = [gate | up] along the last dimension (one GEMM's output)."""
    return _SwiGLU.apply(gate_up, compiled)


# ---------------------------------------------------------------------------------------------------------------------
# RMSNorm


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 at least (half-precision activations are normalised in fp32; fp64 stays fp64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _rms_norm_forward(x, weight, eps: float):
    xf = _wide(x)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


def _rms_norm_backward(x, weight, rstd, dy):
    d = x.shape[-1]
    xhat = _wide(x) * rstd
    t = _wide(dy) * xhat
    d_weight = t.reshape(-1, d).sum(0).to(weight.dtype)
    mean_gx = (t * _wide(weight)).sum(-1, keepdim=True) / d
    return ((_wide(dy * weight) - xhat * mean_gx) * rstd).to(x.dtype), d_weight


def _rms_norm_eager(x, weight, eps: float, out=None):
    """The eager forward -> (y, rstd); y written into ``out`` when given (x's shape and dtype; a slice of a bigger
    tensor is fine)."""
    xf = _wide(x)
    rstd = torch.linalg.vector_norm(xf, 2, dim=-1, keepdim=True).pow_(2).div_(x.shape[-1]).add_(eps).rsqrt_()
    if xf is x and weight.dtype == x.dtype:
        return torch.mul(x, rstd, out=out).mul_(weight), rstd
    y = weight * (xf * rstd).to(x.dtype)
    return (y if out is None else out.copy_(y)), rstd


def _rms_norm_grad_eager(x, weight, rstd, dy, need_weight: bool = True, out=None):
    """The eager backward -> (dx, d weight or None unless ``need_weight``); dx written into ``out`` when given."""
    d = x.shape[-1]
    xhat = _wide(x) * rstd
    t = _wide(dy) * xhat
    d_weight = t.reshape(-1, d).sum(0).to(weight.dtype) if need_weight else None
    mean_gx = torch.mv(t.reshape(-1, d), _wide(weight)).div_(d).view(rstd.shape)
    if xhat.dtype == x.dtype == dy.dtype == weight.dtype:
        return torch.mul(dy, weight, out=out).addcmul_(xhat, mean_gx, value=-1).mul_(rstd), d_weight
    dx = _wide(dy * weight).addcmul_(xhat, mean_gx, value=-1).mul_(rstd).to(x.dtype)
    return (dx if out is None else out.copy_(dx)), d_weight


class _RMSNorm(torch.autograd.Function):
    """y = w * (x * rstd), rstd = rsqrt(mean(x^2) + eps), normalised in fp32 and cast to x's dtype before the weight
    (Hugging Face Llama's order; in fp32 the weight folds into the product). The mean square is one reduction pass
    (``vector_norm``). Backward, closed form in fp32, with t = dy * xhat:
    dw = sum over tokens of t;  dx = rstd * (dy * w - xhat * (t @ w) / D)   [mean(dy w xhat) = (t @ w) / D]
    i.e. five passes over [N, D] and one matrix-vector product (the composite form takes about a dozen)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, compiled: bool):
        ctx.compiled = _use_compiled(compiled, x)
        if ctx.compiled:
            _any_rows(x)
            y, rstd = _compile_kernel(_rms_norm_forward)(x, weight, eps)
        else:
            y, rstd = _rms_norm_eager(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        if ctx.compiled:
            _any_rows(x, rstd, dy)
            dx, d_weight = _compile_kernel(_rms_norm_backward)(x, weight, rstd, dy)
            return dx, d_weight if ctx.needs_input_grad[1] else None, None, None
        dx, d_weight = _rms_norm_grad_eager(x, weight, rstd, dy, ctx.needs_input_grad[1])
        return dx, d_weight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, compiled: bool = False) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension with ``weight`` [D]."""
    return _RMSNorm.apply(x, weight, eps, compiled)


# ---------------------------------------------------------------------------------------------------------------------
# QK-norm on the fused projection


def _qk_norm_forward(x, wq, wk, heads: int, kv_heads: int, eps: float):
    q, k, v = x[:, :heads], x[:, heads:heads + kv_heads], x[:, heads + kv_heads:]
    (qn, rq), (kn, rk) = _rms_norm_forward(q, wq, eps), _rms_norm_forward(k, wk, eps)
    return torch.cat([qn.to(x.dtype), kn.to(x.dtype), v], dim=1), rq, rk


def _qk_norm_backward(x, wq, wk, rq, rk, dy, heads: int, kv_heads: int):
    hk = heads + kv_heads
    dq, dwq = _rms_norm_backward(x[:, :heads], wq, rq, dy[:, :heads])
    dk, dwk = _rms_norm_backward(x[:, heads:hk], wk, rk, dy[:, heads:hk])
    return torch.cat([dq, dk, dy[:, hk:]], dim=1), dwq, dwk


class _QKNorm(torch.autograd.Function):
    """One modality's fused q/k/v GEMM output [n, (Hq + 2 Hkv) * hd] -> the same layout with every query head and
    every key head RMS-normalised over hd (weights [hd]), the values as they are. The output is written part by part
    into one tensor and so is the gradient: no split into q, k, v and concatenation back (which cost a pass over
    [n, 3D] each way besides the norms)."""

    @staticmethod
    def forward(ctx, x, wq, wk, heads: int, kv_heads: int, eps: float, compiled: bool):
        n, hd = x.shape[0], wq.shape[0]
        xv = x.view(n, x.shape[1] // hd, hd)
        hk = heads + kv_heads
        ctx.heads, ctx.kv_heads, ctx.compiled = heads, kv_heads, _use_compiled(compiled, x)
        if ctx.compiled:
            _any_rows(xv)
            out, rq, rk = _compile_kernel(_qk_norm_forward)(xv, wq, wk, heads, kv_heads, eps)
        else:
            out = torch.empty_like(xv)
            rq = _rms_norm_eager(xv[:, :heads], wq, eps, out=out[:, :heads])[1]
            rk = _rms_norm_eager(xv[:, heads:hk], wk, eps, out=out[:, heads:hk])[1]
            out[:, hk:].copy_(xv[:, hk:])
        ctx.save_for_backward(xv, wq, wk, rq, rk)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        xv, wq, wk, rq, rk = ctx.saved_tensors
        h, hk = ctx.heads, ctx.heads + ctx.kv_heads
        dy = dy.view(xv.shape)
        if ctx.compiled:
            _any_rows(xv, rq, rk, dy)
            dx, dwq, dwk = _compile_kernel(_qk_norm_backward)(xv, wq, wk, rq, rk, dy, h, ctx.kv_heads)
        else:
            dx = torch.empty_like(xv)
            dwq = _rms_norm_grad_eager(xv[:, :h], wq, rq, dy[:, :h], out=dx[:, :h])[1]
            dwk = _rms_norm_grad_eager(xv[:, h:hk], wk, rk, dy[:, h:hk], out=dx[:, h:hk])[1]
            dx[:, hk:].copy_(dy[:, hk:])
        return dx.view(xv.shape[0], xv.shape[1] * xv.shape[2]), dwq, dwk, None, None, None, None


def qk_norm(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, heads: int, kv_heads: int,
            eps: float, compiled: bool = False) -> torch.Tensor:
    """RMSNorm over head_dim of the query and key heads of a fused projection ``qkv`` [n, (Hq + 2 Hkv) * hd]
    (QK-norm, before RoPE), values untouched; the same layout back."""
    return _QKNorm.apply(qkv, q_weight, k_weight, heads, kv_heads, eps, compiled)
