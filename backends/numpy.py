"""The NumPy adapter: linear attention blocked over tokens, with fused in-place feature maps.

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

import numpy as np

from kernelattn.backends._base import Adapter

#: tokens per block (a multiple of the chunk size); chosen for the caches of a small x86 CPU
BLOCK = 512
_FUSED = ("ffn", "glu", "aoglu", "elu", "relu")


class NumPyAdapter(Adapter):
    name = library = "numpy"

    def supports(self, op, *, device_type, dtype, **static):
        if op != "linear_attention":
            return f"no fast path for {op}"
        if static.get("method") in ("naive", "recurrent"):
            return f"method={static['method']!r} is a reference strategy; the core runs it"
        return True

    def linear_attention(self, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, method,
                         initial_state, return_state, xp):
        dtype = q.dtype
        cdt = np.float32 if dtype.itemsize < 4 else dtype
        phi = _FeatureBlocks(feature_map, cdt)
        B, H, N, _ = q.shape
        e = v.shape[3]
        S = z = None
        if initial_state is not None:
            S, z = (np.array(s, dtype=cdt) for s in initial_state)
        mask = None if key_mask is None else np.asarray(key_mask, dtype=bool)
        with np.errstate(over="ignore", under="ignore"):
            if causal:
                out, S, z = _causal(q, k, v, mask, phi, S, z, eps, chunk_size, cdt)
            else:
                S, z = _states(k, v, mask, phi, S, z, cdt)
                out = np.empty((B, H, N, e), dtype=cdt)
                for lo in range(0, N, BLOCK):
                    hi = min(N, lo + BLOCK)
                    fq = phi(q[:, :, lo:hi], "query")
                    _readout(fq, S, z, eps, out[:, :, lo:hi])
        out = out.astype(dtype, copy=False)
        return out, ((S, z) if return_state else None)


ADAPTER = NumPyAdapter()


class _FeatureBlocks:
    """phi applied to one block of tokens at a time, in place into reused buffers.

    A call for ``role`` returns a view of that role's buffer, valid until the
    next call for the same role.
    """

    def __init__(self, feature_map, cdt):
        self.map = feature_map
        self.kind = getattr(feature_map, "kind", "callable")
        self.cdt = cdt
        self.blocks = {}
        self.buffers = {}
        if self.kind in ("ffn", "glu", "aoglu"):
            for role in ("query", "key"):
                self.blocks[role] = [{name: np.ascontiguousarray(a, dtype=cdt) for name, a in blk.items()}
                                     for blk in feature_map.blocks(role)]

    def _buf(self, name, shape):
        buf = self.buffers.get(name)
        if buf is None or buf.size < np.prod(shape):
            buf = self.buffers[name] = np.empty(int(np.prod(shape)), dtype=self.cdt)
        return buf[: int(np.prod(shape))].reshape(shape)

    def __call__(self, x, role):
        if self.kind not in _FUSED:
            from kernelattn._compat import numpy_namespace

            return np.asarray(self.map.apply(np.asarray(x, dtype=self.cdt), role=role, xp=numpy_namespace()),
                              dtype=self.cdt)
        if x.dtype != self.cdt:
            x = x.astype(self.cdt)
        if self.kind in ("elu", "relu"):
            y = self._buf(role, x.shape)
            if self.kind == "relu":
                return np.maximum(x, 0, out=y)
            np.minimum(x, 0, out=y)   # elu(x) + 1 = exp(min(x, 0)) + max(x, 0)
            np.exp(y, out=y)
            y += np.maximum(x, 0, out=self._buf("tmp", x.shape))
            return y
        blocks = self.blocks[role]
        last = len(blocks) - 1
        for i, blk in enumerate(blocks):
            shape = x.shape[:-1] + (blk["W"].shape[-1],)
            y = np.matmul(x, blk["W"], out=self._buf(f"{role}{i % 2}", shape))
            if "b" in blk:
                y += blk["b"][:, None, :]
            if i == last:
                _softplus_(y, self._buf("tmp", shape))
            if "G" in blk or "A" in blk:
                g = self._buf("gate", shape)
                if "G" in blk:
                    np.matmul(x, blk["G"], out=g)
                else:
                    np.matmul(np.matmul(x, blk["A"]), blk["B"], out=g)
                if "c" in blk:
                    g += blk["c"][:, None, :]
                np.negative(g, out=g)  # y * sigmoid(g) = y / (1 + exp(-g))
                np.exp(g, out=g)
                g += 1
                np.divide(y, g, out=y)
            x = y
        return x


def _softplus_(y, tmp):
    """y <- log(1 + exp(y)) = max(y, 0) + log1p(exp(-|y|)), in place (np.logaddexp is ~15x slower)."""
    np.abs(y, out=tmp)
    np.negative(tmp, out=tmp)
    np.exp(tmp, out=tmp)
    np.log1p(tmp, out=tmp)
    np.maximum(y, 0, out=y)
    y += tmp


def _masked(fk, v, mask, lo, hi):
    if mask is None:
        return fk, v
    keep = mask[:, None, lo:hi, None]
    return fk * keep, np.where(keep, v, 0)


def _states(k, v, mask, phi, S, z, cdt):
    """S = sum phi(K)^T V and z = sum phi(K) over key blocks, added to (S, z) if given."""
    B, H, L, _ = k.shape
    e = v.shape[3]
    for lo in range(0, L, BLOCK):
        hi = min(L, lo + BLOCK)
        fk = phi(k[:, :, lo:hi], "key")
        fk, vb = _masked(fk, np.asarray(v[:, :, lo:hi], dtype=cdt), mask, lo, hi)
        Sb = np.matmul(fk.swapaxes(-1, -2), vb)
        zb = fk.sum(axis=2)
        S = Sb if S is None else S + Sb
        z = zb if z is None else z + zb
    if S is None:  # no keys at all
        m = phi(np.zeros((B, H, 1, k.shape[3]), dtype=cdt), "key").shape[-1]
        S, z = np.zeros((B, H, m, e), dtype=cdt), np.zeros((B, H, m), dtype=cdt)
    return S, z


def _readout(fq, S, z, eps, out):
    np.matmul(fq, S, out=out)
    den = np.matmul(fq, z[..., None])
    den += eps
    np.divide(out, den, out=out)


def _causal(q, k, v, mask, phi, S, z, eps, chunk_size, cdt):
    B, H, N, _ = q.shape
    e = v.shape[3]
    C = max(1, min(chunk_size, N))
    step = max(C, (BLOCK // C) * C)
    out = np.empty((B, H, N, e), dtype=cdt)
    tril = np.tril(np.ones((C, C), dtype=cdt))
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        n = hi - lo
        fq = phi(q[:, :, lo:hi], "query")
        fk = phi(k[:, :, lo:hi], "key")
        fk, vb = _masked(fk, np.asarray(v[:, :, lo:hi], dtype=cdt), mask, lo, hi)
        if S is None:
            m = fq.shape[-1]
            S, z = np.zeros((B, H, m, e), dtype=cdt), np.zeros((B, H, m), dtype=cdt)
        nc, rem = divmod(n, C)
        if nc:  # whole chunks of this block, vectorised
            w = nc * C
            m = fq.shape[-1]
            fq_c = fq[:, :, :w].reshape(B, H, nc, C, m)
            fk_c = fk[:, :, :w].reshape(B, H, nc, C, m)
            v_c = vb[:, :, :w].reshape(B, H, nc, C, e)
            A = np.matmul(fq_c, fk_c.swapaxes(-1, -2))
            A *= tril
            num = np.matmul(A, v_c)
            den = A.sum(axis=-1, keepdims=True)
            Sc = np.matmul(fk_c.swapaxes(-1, -2), v_c)  # (B, H, nc, m, e)
            zc = fk_c.sum(axis=-2)
            S_prev = np.cumsum(Sc, axis=2)
            S_prev -= Sc
            S_prev += S[:, :, None]
            z_prev = np.cumsum(zc, axis=2)
            z_prev -= zc
            z_prev += z[:, :, None]
            num += np.matmul(fq_c, S_prev)
            den += np.matmul(fq_c, z_prev[..., None])
            den += eps
            np.divide(num, den, out=num)
            out[:, :, lo:lo + w] = num.reshape(B, H, w, e)
            S = S_prev[:, :, -1] + Sc[:, :, -1]
            z = z_prev[:, :, -1] + zc[:, :, -1]
        if rem:  # a last partial chunk
            a, b = lo + nc * C, hi
            fq_r, fk_r, v_r = fq[:, :, nc * C:], fk[:, :, nc * C:], vb[:, :, nc * C:]
            A = np.matmul(fq_r, fk_r.swapaxes(-1, -2)) * tril[:rem, :rem]
            num = np.matmul(A, v_r) + np.matmul(fq_r, S)
            den = A.sum(axis=-1, keepdims=True) + np.matmul(fq_r, z[..., None]) + eps
            out[:, :, a:b] = num / den
            S = S + np.matmul(fk_r.swapaxes(-1, -2), v_r)
            z = z + fk_r.sum(axis=-2)
    if S is None:
        S, z = _states(k, v, mask, phi, None, None, cdt)
    return out, S, z
