"""Feature maps phi written with native torch ops, for the torch fast paths.

The same math as :mod:`kernelattn._agnostic.feature_maps` (and tested against
it), without the array-API wrapper layer: fewer temporaries and less Python
per call, which matters when the fast paths apply phi to many small blocks of
tokens. Autograd sees through every function here.

Every function takes ``x`` of shape (B, H, n, d) in the compute dtype and
returns (B, H, n, m) in that dtype. Parameters of shape (H, d_in, d_out)
broadcast over the batch axis, or are already expanded to (B, H, d_in, d_out)
(see :func:`expand_blocks`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F



def softplus(y):
    """``log(1 + exp(y))``; exact to rounding in float32 and float64.

    torch returns ``y`` itself above ``threshold``; the neglected term is
    ``log1p(exp(-y))``, below half an ulp of ``y`` from 20 (float32) and 40
    (float64) on.
    """
    return F.softplus(y, beta=1.0, threshold=40.0 if y.dtype == torch.float64 else 20.0)


def softplus_(y, again=None):
    """Softplus of a fresh (B, H, n, m) tensor, in place, for inference (no autograd).

    Usually ``log1p(exp(y))`` in two in-place passes and no temporary, faster
    here than ``F.softplus``: on the CPU through NumPy
    (:func:`_exp_log1p_numpy_`), elsewhere torch's. It is exact to a few ulp,
    relative, wherever ``exp(y)`` is finite: ``log1p`` keeps the relative
    error of ``exp`` or better. Beyond (y > 88.7), :func:`_softplus_exact_`
    runs instead; NaN and +-inf come out as softplus gives them.

    ``again``: a function that makes ``y`` anew. With it, the CPU form skips
    the check for large values (an ``amax`` pass): NumPy flags an overflow
    after the fact, and the block is then made again (``y`` was overwritten)
    and takes the exact form. float64 keeps :func:`softplus`.
    """
    if y.dtype != torch.float32 or y.numel() == 0:
        return softplus(y)
    if y.device.type == "cpu" and not y.requires_grad:
        if (again is None or not _overflow_flagged()) and not float(y.amax()) <= 80.0:  # True for a NaN
            return _softplus_exact_(y)
        if _exp_log1p_numpy_(y):
            return y
        return _softplus_exact_(again())
    if float(y.amax()) <= 80.0:  # False for a NaN
        return y.exp_().log1p_()
    return _softplus_exact_(y)


def _exp_log1p_numpy_(y) -> bool:
    """``log1p(exp(y))`` in place through NumPy's float32 ``exp`` and ``log1p``; False if ``exp`` overflowed.

    One NumPy thread is as fast here as torch's two (the ffn forward at N = 16384, B = 1, H = 8,
    ``asv_benchmarks/torch_cpu_targets.py``). The overflow is NumPy's floating-point flag, seen after
    the pass (``np.errstate`` is per thread), so no separate pass looks for large values. A NaN
    raises no flag and stays NaN, +inf gives inf: both are softplus' values.
    """
    a = y.numpy()
    try:
        with np.errstate(over="raise"):
            np.exp(a, out=a)
    except FloatingPointError:
        return False
    np.log1p(a, out=a)
    return True


_FLAGGED: list = []


def _overflow_flagged() -> bool:
    """Whether this NumPy flags an overflow of float32 ``exp`` in the SIMD body and in the tail of an array.

    Checked once: where it does not, :func:`softplus_` takes the maximum first on every block.
    """
    if not _FLAGGED:
        ok = True
        for at in (3, 66):  # a vector lane, then the remainder after the last full vector
            a = np.zeros(67, dtype=np.float32)
            a[at] = 100.0
            try:
                with np.errstate(over="raise"):
                    np.exp(a, out=a)
                ok = False
            except FloatingPointError:
                pass
        _FLAGGED.append(ok)
    return _FLAGGED[0]


def _softplus_exact_(y):
    """``max(log1p(exp(min(y, 20))), y)`` in place, with ``log1p(t) = log(u) - ((u - 1) - t) / u``, ``u = 1 + t``.

    The correction recovers what rounding ``u`` lost (Kahan's trick), so tiny
    values keep their relative accuracy (1e-7), with fast ``log`` still.
    """
    t = torch.clamp(y, max=20.0).exp_()
    u = t + 1.0
    c = (u - 1.0).sub_(t).div_(u)
    return torch.maximum(u.log_().sub_(c), y, out=y)


def _param(p, like):
    return p if p.dtype == like.dtype else p.to(like.dtype)


def _bias(b, like):
    # (H, m) or (B, H, m) -> broadcastable against (B, H, n, m)
    return _param(b, like).unsqueeze(-2)


def feedforward(x, blocks, *, dropout: float = 0.0, training: bool = False, inplace: bool = False):
    """A stack of ffn / glu / aoglu blocks, Softplus on the last one only.

    ``dropout`` (applied to every block's input when ``training``) is the
    paper's regularisation of the kernel; the array-API core has none.
    ``inplace`` (inference only) reuses the intermediates.
    """
    if inplace:
        return _feedforward_inplace(x, blocks)
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        if dropout and training:
            x = F.dropout(x, dropout, training=True)
        y = torch.matmul(x, _param(block["W"], x))
        if block.get("b") is not None:
            y = y + _bias(block["b"], y)
        if i == last:
            y = softplus(y)
        if "G" in block:
            g = torch.matmul(x, _param(block["G"], x))
        elif "A" in block:
            g = torch.matmul(torch.matmul(x, _param(block["A"], x)), _param(block["B"], x))
        else:
            g = None
        if g is not None:
            if block.get("c") is not None:
                g = g + _bias(block["c"], g)
            y = y * torch.sigmoid(g)
        x = y
    return x


def _feedforward_inplace(x, blocks):
    last = len(blocks) - 1
    for i, block in enumerate(blocks):
        def pre(x=x, block=block):
            y = torch.matmul(x, _param(block["W"], x))
            if block.get("b") is not None:
                y.add_(_bias(block["b"], y))
            return y

        y = pre()
        if i == last:
            y = softplus_(y, again=pre)
        if "G" in block or "A" in block:
            if "G" in block:
                g = torch.matmul(x, _param(block["G"], x))
            else:
                g = torch.matmul(torch.matmul(x, _param(block["A"], x)), _param(block["B"], x))
            if block.get("c") is not None:
                g.add_(_bias(block["c"], g))
            y.mul_(g.sigmoid_())
        x = y
    return x


def hedgehog(x, block):
    """``[softmax(x W + b), softmax(-(x W + b))]`` over the features."""
    y = torch.matmul(x, _param(block["W"], x))
    if block.get("b") is not None:
        y = y + _bias(block["b"], y)
    return torch.cat([torch.softmax(y, dim=-1), torch.softmax(-y, dim=-1)], dim=-1)


def favor(x, omega):
    """Performer's positive random features, as in the core (``omega`` (H, d, m))."""
    d, m = x.shape[-1], omega.shape[-1]
    xs = x * (1.0 / d**0.25)
    proj = torch.matmul(xs, _param(omega, xs))
    sq = (xs * xs).sum(dim=-1, keepdim=True) * 0.5
    return torch.exp(proj - sq) * (1.0 / math.sqrt(m))


#: below this many elements (and with no autograd) elu + 1 is formed as exp(min(x, 0)) + relu(x)
ELU_SMALL = 1 << 17


def elu_plus_one(x):
    """``elu(x) + 1``, positive.

    For small tensors without autograd, ``exp(min(x, 0)) + relu(x)`` (the same function, exp rounded
    once instead of expm1 + 1): torch's elu runs these sizes on one thread at ~1.6 ns an element,
    ~40 % slower here at 16K-128K elements than the three in-place ops.
    """
    if x.numel() <= ELU_SMALL and not (x.requires_grad and torch.is_grad_enabled()) \
            and not torch.compiler.is_compiling():
        return torch.clamp(x, max=0.0).exp_().add_(torch.relu(x))
    return F.elu(x).add_(1.0)  # in place is safe under autograd: elu saves its input, not its result


def apply(phi, x, *, role: str, dropout: float = 0.0, training: bool = False, blocks=None, inplace: bool = False):
    """phi(x) for a kernelattn feature map object (FeatureMap or CallableFeatureMap).

    Parameters
    ----------
    phi : FeatureMap or CallableFeatureMap
    x : torch.Tensor, shape (B, H, n, d)
        In the compute dtype.
    role : {"query", "key"}
    dropout, training
        Dropout on every block input of a trainable map (and on ``x`` for the
        others), active only when ``training``.
    blocks : list of dict, optional
        The role's blocks, already expanded (see :func:`expand_blocks`).
    inplace : bool
        Inference only (no autograd): reuse intermediates and use
        :func:`softplus_`.

    Returns
    -------
    torch.Tensor, shape (B, H, n, m)
    """
    form = FORMS.get(getattr(phi, "form", None))
    if form is None:  # a user callable, or a kind without a torch form: its own (array-API) forward
        if dropout and training:
            x = F.dropout(x, dropout, training=True)
        xp = None if not hasattr(phi, "definition") else _namespace(x)
        return phi.apply(x, role=role, xp=xp)
    blocks = (phi.blocks(role) if hasattr(phi, "blocks") else []) if blocks is None else blocks
    return form(x, blocks, getattr(phi, "buffers", {}), dropout=dropout, training=training, inplace=inplace)


def _namespace(x):
    from kernelattn._compat import array_namespace

    return array_namespace(x)


def _dropped(fn):
    # forms without blocks of their own: dropout acts on the input
    def form(x, blocks, buffers, *, dropout, training, inplace):
        if dropout and training:
            x = F.dropout(x, dropout, training=True)
        return fn(x, blocks, buffers)

    return form


#: form name (kernelattn/kinds.py) -> the torch version: ``form(x, blocks, buffers, *, dropout, training, inplace)``
#: forms whose features are never negative (all of FORMS): den = 0 then only where z = 0
NONNEGATIVE_FORMS = ("feedforward", "hedgehog", "elu", "relu", "favor")

FORMS = {
    "feedforward": lambda x, blocks, buffers, *, dropout, training, inplace: feedforward(
        x, blocks, dropout=dropout, training=training, inplace=inplace),
    "hedgehog": _dropped(lambda x, blocks, buffers: hedgehog(x, blocks[0])),
    "elu": _dropped(lambda x, blocks, buffers: elu_plus_one(x)),
    "relu": _dropped(lambda x, blocks, buffers: torch.relu(x)),
    "favor": _dropped(lambda x, blocks, buffers: favor(x, buffers["omega"])),
}


def expand_blocks(blocks, batch: int, dtype):
    """The blocks with every parameter cast to ``dtype`` and expanded to (B, H, ...) contiguous.

    Done once per call by the blocked paths, so each block of tokens is a
    plain batched product instead of a broadcast that copies the weights.
    """
    out = []
    for block in blocks:
        new = {}
        for name, p in block.items():
            if p is None:
                continue
            p = p.to(dtype)
            if batch > 1:
                p = p.unsqueeze(0).expand(batch, *p.shape).contiguous()
            new[name] = p
        out.append(new)
    return out


def feature_dim(phi, d: int):
    """m of ``phi`` applied to width-``d`` inputs, or None when only a call can tell."""
    return phi.width(d) if hasattr(phi, "width") else None
