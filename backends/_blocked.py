"""Linear attention blocked over tokens, for NumPy-like libraries (NumPy, CuPy).

The array-API core computes phi(Q), phi(K) and every intermediate for the whole
sequence at once; at long lengths those temporaries leave the caches and their
first touch costs page faults, which on a small machine costs more than the
matrix products themselves. Here the sequence is processed in blocks of
``block`` tokens (all batches and heads at once, so each product is one batched
BLAS call): the feature map is applied to one block at a time with in-place
ufuncs into reused buffers, and the attention products follow while the block
is still in cache.

* non-causal: pass 1 accumulates S = sum phi(K_b)^T V_b and z over key blocks;
  pass 2 reads every query block out against (S, z);
* causal: each block runs the chunked form (exact masked products inside
  chunks of C tokens, an exclusive prefix of chunk states between them) from
  the state carried over from earlier blocks.

Memory stays O(block) beyond the inputs and the output. Results equal the
core's to float rounding (tests compare them).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

#: feature-map forms (kernelattn/kinds.py) written here with in-place ufuncs
FORMS = ("feedforward", "elu", "relu")


def linear_attention(lib, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, initial_state,
                     return_state, block, kernels=None):
    """Blocked linear attention with ``lib`` (numpy or cupy); returns ``(out, state or None)``.

    ``kernels`` may supply fused in-place steps (``softplus_(y)``,
    ``gate_(y, g)`` for ``y / (1 + exp(-g))``) that replace the ufunc chains.
    """
    dtype = q.dtype
    cdt = lib.float32 if dtype.itemsize < 4 else dtype
    phi = _FeatureBlocks(lib, feature_map, cdt, kernels)
    B, H, N, _ = q.shape
    e = v.shape[3]
    S = z = None
    if initial_state is not None:
        S, z = (lib.array(s, dtype=cdt) for s in initial_state)
    mask = None if key_mask is None else lib.asarray(key_mask, dtype=bool)
    quiet = np.errstate(over="ignore", under="ignore") if lib is np else contextlib.nullcontext()
    with quiet:
        if causal:
            out, S, z = _causal(lib, q, k, v, mask, phi, S, z, eps, chunk_size, cdt, block)
        else:
            S, z = _states(lib, k, v, mask, phi, S, z, cdt, block)
            out = lib.empty((B, H, N, e), dtype=cdt)
            for lo in range(0, N, block):
                hi = min(N, lo + block)
                fq = phi(q[:, :, lo:hi], "query")
                _readout(lib, fq, S, z, eps, out[:, :, lo:hi])
    out = out.astype(dtype, copy=False)
    return out, ((S, z) if return_state else None)


class _FeatureBlocks:
    """phi applied to one block of tokens at a time, in place into reused buffers.

    A call for ``role`` returns a view of that role's buffer, valid until the
    next call for the same role.
    """

    def __init__(self, lib, feature_map, cdt, kernels=None):
        self.lib = lib
        self.kernels = kernels or {}
        self.map = feature_map
        # forms (kernelattn/kinds.py) written here with in-place ufuncs; other maps run their own forward
        form = getattr(feature_map, "form", None)
        self.form = getattr(self, f"_{form}") if form in FORMS else None
        self.cdt = cdt
        self.blocks = {}
        self.buffers = {}
        if self.form == self._feedforward:
            for role in ("query", "key"):
                self.blocks[role] = [{name: lib.ascontiguousarray(lib.asarray(a), dtype=cdt)
                                      for name, a in blk.items()}
                                     for blk in feature_map.blocks(role)]

    def _buf(self, name, shape):
        size = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.size < size:
            buf = self.buffers[name] = self.lib.empty(size, dtype=self.cdt)
        return buf[:size].reshape(shape)

    def __call__(self, x, role):
        lib = self.lib
        if self.form is None:
            from kernelattn._compat import array_namespace

            x = lib.asarray(x, dtype=self.cdt)
            return lib.asarray(self.map.apply(x, role=role, xp=array_namespace(x)), dtype=self.cdt)
        if x.dtype != self.cdt:
            x = x.astype(self.cdt)
        return self.form(x, role)

    def _relu(self, x, role):
        return self.lib.maximum(x, 0, out=self._buf(role, x.shape))

    def _elu(self, x, role):
        lib = self.lib
        y = self._buf(role, x.shape)
        lib.minimum(x, 0, out=y)   # elu(x) + 1 = exp(min(x, 0)) + max(x, 0)
        lib.exp(y, out=y)
        y += lib.maximum(x, 0, out=self._buf("tmp", x.shape))
        return y

    def _feedforward(self, x, role):
        lib = self.lib
        blocks = self.blocks[role]
        last = len(blocks) - 1
        for i, blk in enumerate(blocks):
            shape = x.shape[:-1] + (blk["W"].shape[-1],)
            y = lib.matmul(x, blk["W"], out=self._buf(f"{role}{i % 2}", shape))
            if "b" in blk:
                y += blk["b"][:, None, :]
            if i == last:
                if "softplus_" in self.kernels:
                    self.kernels["softplus_"](y)
                else:
                    _softplus_(lib, y, self._buf("tmp", shape))
            if "G" in blk or "A" in blk:
                g = self._buf("gate", shape)
                if "G" in blk:
                    lib.matmul(x, blk["G"], out=g)
                else:
                    lib.matmul(lib.matmul(x, blk["A"]), blk["B"], out=g)
                if "c" in blk:
                    g += blk["c"][:, None, :]
                if "gate_" in self.kernels:
                    self.kernels["gate_"](y, g)
                else:  # y * sigmoid(g) = y / (1 + exp(-g))
                    lib.negative(g, out=g)
                    lib.exp(g, out=g)
                    g += 1
                    lib.divide(y, g, out=y)
            x = y
        return x


def _softplus_(lib, y, tmp):
    """y <- log(1 + exp(y)) = max(y, 0) + log1p(exp(-|y|)), in place (np.logaddexp is ~15x slower)."""
    lib.abs(y, out=tmp)
    lib.negative(tmp, out=tmp)
    lib.exp(tmp, out=tmp)
    lib.log1p(tmp, out=tmp)
    lib.maximum(y, 0, out=y)
    y += tmp


def _masked(lib, fk, v, mask, lo, hi):
    if mask is None:
        return fk, v
    keep = mask[:, None, lo:hi, None]
    return lib.where(keep, fk, 0), lib.where(keep, v, 0)  # select, never multiply: 0 * NaN is NaN


def _states(lib, k, v, mask, phi, S, z, cdt, block):
    """S = sum phi(K)^T V and z = sum phi(K) over key blocks, added to (S, z) if given."""
    B, H, L, _ = k.shape
    e = v.shape[3]
    for lo in range(0, L, block):
        hi = min(L, lo + block)
        fk = phi(k[:, :, lo:hi], "key")
        fk, vb = _masked(lib, fk, lib.asarray(v[:, :, lo:hi], dtype=cdt), mask, lo, hi)
        Sb = lib.matmul(fk.swapaxes(-1, -2), vb)
        zb = fk.sum(axis=2)
        S = Sb if S is None else S + Sb
        z = zb if z is None else z + zb
    if S is None:  # no keys at all
        m = phi(lib.zeros((B, H, 1, k.shape[3]), dtype=cdt), "key").shape[-1]
        S, z = lib.zeros((B, H, m, e), dtype=cdt), lib.zeros((B, H, m), dtype=cdt)
    return S, z


def _divide_(lib, num, den, eps):
    """num <- num / (den + eps) where den != 0, else 0 (nothing to attend to), for every eps >= 0."""
    empty = den == 0
    den += eps
    lib.divide(num, den, out=num, where=~empty) if lib is np else lib.divide(num, den, out=num)
    if empty.any():
        num[...] = lib.where(empty, 0, num)


def _readout(lib, fq, S, z, eps, out):
    lib.matmul(fq, S, out=out)
    _divide_(lib, out, lib.matmul(fq, z[..., None]), eps)


def _exclusive_cumsum(lib, x):
    """Sums of the chunks before each one along axis 2 (zeros first)."""
    out = lib.empty_like(x)
    out[:, :, :1] = 0
    lib.cumsum(x[:, :, :-1], axis=2, out=out[:, :, 1:])
    return out


def _causal(lib, q, k, v, mask, phi, S, z, eps, chunk_size, cdt, block):
    B, H, N, _ = q.shape
    e = v.shape[3]
    C = max(1, min(chunk_size, N))
    step = max(C, (block // C) * C)
    out = lib.empty((B, H, N, e), dtype=cdt)
    tril = lib.tril(lib.ones((C, C), dtype=cdt))
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        n = hi - lo
        fq = phi(q[:, :, lo:hi], "query")
        fk = phi(k[:, :, lo:hi], "key")
        fk, vb = _masked(lib, fk, lib.asarray(v[:, :, lo:hi], dtype=cdt), mask, lo, hi)
        if S is None:
            m = fq.shape[-1]
            S, z = lib.zeros((B, H, m, e), dtype=cdt), lib.zeros((B, H, m), dtype=cdt)
        nc, rem = divmod(n, C)
        if nc:  # whole chunks of this block, vectorised
            w = nc * C
            m = fq.shape[-1]
            fq_c = fq[:, :, :w].reshape(B, H, nc, C, m)
            fk_c = fk[:, :, :w].reshape(B, H, nc, C, m)
            v_c = vb[:, :, :w].reshape(B, H, nc, C, e)
            A = lib.matmul(fq_c, fk_c.swapaxes(-1, -2))
            A *= tril
            num = lib.matmul(A, v_c)
            den = A.sum(axis=-1, keepdims=True)
            Sc = lib.matmul(fk_c.swapaxes(-1, -2), v_c)  # (B, H, nc, m, e)
            zc = fk_c.sum(axis=-2)
            S_prev = _exclusive_cumsum(lib, Sc)  # shifted sums: cumsum - Sc would cancel
            S_prev += S[:, :, None]
            z_prev = _exclusive_cumsum(lib, zc)
            z_prev += z[:, :, None]
            num += lib.matmul(fq_c, S_prev)
            den += lib.matmul(fq_c, z_prev[..., None])
            _divide_(lib, num, den, eps)
            out[:, :, lo:lo + w] = num.reshape(B, H, w, e)
            S = S_prev[:, :, -1] + Sc[:, :, -1]
            z = z_prev[:, :, -1] + zc[:, :, -1]
        if rem:  # a last partial chunk
            a, b = lo + nc * C, hi
            fq_r, fk_r, v_r = fq[:, :, nc * C:], fk[:, :, nc * C:], vb[:, :, nc * C:]
            A = lib.matmul(fq_r, fk_r.swapaxes(-1, -2)) * tril[:rem, :rem]
            num = lib.matmul(A, v_r) + lib.matmul(fq_r, S)
            _divide_(lib, num, A.sum(axis=-1, keepdims=True) + lib.matmul(fq_r, z[..., None]), eps)
            out[:, :, a:b] = num
            S = S + lib.matmul(fk_r.swapaxes(-1, -2), v_r)
            z = z + fk_r.sum(axis=-2)
    if S is None:
        S, z = _states(lib, k, v, mask, phi, None, None, cdt, block)
    return out, S, z
