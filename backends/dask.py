"""The Dask adapter: linear attention over sequences split into blocks, lazily.

Dask arrays chunked along the sequence axis (axis 2 of (B, H, N, d)) are
processed block by block; no block ever needs the whole sequence in memory,
and the task graph grows linearly with the number of blocks:

* non-causal: every key block yields its state (S_b, z_b) = (phi(K_b)^T V_b,
  sum phi(K_b)); the states are summed by a tree reduction; every query block
  then reads the total out: ``phi(Q_b) S / (phi(Q_b) z + eps)``;
* causal: the block states are combined by a blockwise exclusive prefix
  (state before block b = sum of the states of blocks < b, plus any initial
  state), and each block runs chunked causal attention locally, starting from
  its prefix.

Nothing is computed until ``.compute()``; with ``dask.distributed`` the blocks
run on the workers of a cluster. Inside a task, blocks are NumPy arrays and go
through :func:`kernelattn.linear_attention`, so NumPy's own fast path serves
them.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
from dask import delayed

from kernelattn.backends._base import Adapter


class DaskAdapter(Adapter):
    name = library = "dask"
    # Each block runs in NumPy, where the public function isolates non-finite values eagerly; a
    # non-finite key reaches later blocks only through the carried state, as the definition says.
    # Doing it lazily on the whole graph instead costs ~75 tasks per block.
    isolates_inputs = True
    implementations = {
        "dask:blockwise": "per-block states, a tree reduction or an exclusive prefix, per-block read-out",
        "dask:lazy-core": "the array-API core on the lazy graph (sequence lengths not known yet)",
    }

    def block(self, x):
        return x.compute()

    def facts(self, op, *, arrays, feature_map):
        if op != "linear_attention":
            return {}
        return {"known_lengths": not any(math.isnan(c) for a in arrays[:3] for c in a.shape)}

    def facts_for(self, op, *, device_type, grad):
        return {} if op != "linear_attention" else {"known_lengths": True}

    def choose(self, op, *, device_type, dtype, **static):
        if static.get("known_lengths", True):
            return "dask:blockwise", self._blockwise, "dask fast path: blockwise over the sequence"
        return "dask:lazy-core", self._lazy_core, "dask: chunk lengths unknown, the core runs on the lazy graph"

    def linear_attention(self, q, k, v, **kw):
        """The implementation :meth:`choose` names for this call (what dispatch runs)."""
        known = self.facts("linear_attention", arrays=(q, k, v), feature_map=None)["known_lengths"]
        return (self._blockwise if known else self._lazy_core)(q, k, v, **kw)

    def _lazy_core(self, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, method, initial_state,
                   return_state, xp):
        from kernelattn._agnostic import attention as core
        from kernelattn._agnostic import isolate

        k, v = isolate.drop_padding(k, v, key_mask, xp=xp)
        q, k, v, initial_state, *guard = isolate.isolate(q, k, v, initial_state, causal=causal, xp=xp)
        out, state = core.linear_attention(q, k, v, feature_map=feature_map, causal=causal, key_mask=key_mask,
                                           eps=eps, chunk_size=chunk_size, method=method,
                                           initial_state=initial_state, return_state=return_state, xp=xp)
        return isolate.poison(out, state, *guard, xp=xp)

    def _blockwise(self, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, method,
                   initial_state, return_state, xp):
        dtype = q.dtype
        cdt = np.float32 if np.dtype(dtype).itemsize < 4 else np.dtype(dtype)
        q, k, v = (a.rechunk({0: -1, 1: -1, 3: -1}) for a in (q, k, v))
        if causal:  # key blocks must line up with query blocks
            k, v = k.rechunk(q.chunks[:3] + (-1,)), v.rechunk(q.chunks[:3] + (-1,))
        else:
            v = v.rechunk(k.chunks[:3] + (-1,))
        if key_mask is not None:
            key_mask = key_mask.rechunk((-1, k.chunks[2]))
        phi = _delayed_feature_map(feature_map)
        B, H = q.shape[:2]
        e = v.shape[3]
        q_blocks = _blocks(q)
        k_blocks, v_blocks = _blocks(k), _blocks(v)
        m_blocks = [None] * len(k_blocks) if key_mask is None else list(key_mask.to_delayed()[0])
        init = None if initial_state is None else delayed(tuple)(list(initial_state))

        states = [delayed(_block_state)(kb, vb, mb, phi, cdt) for kb, vb, mb in zip(k_blocks, v_blocks, m_blocks)]
        outs = []
        if not causal:
            total = _tree_sum(states + ([init] if init is not None else []))
            for qb, n in zip(q_blocks, q.chunks[2]):
                o = delayed(_readout)(qb, total, phi, eps, dtype)
                outs.append(da.from_delayed(o, shape=(B, H, n, e), dtype=dtype))
        else:
            prefix = init
            for qb, kb, vb, mb, st, n in zip(q_blocks, k_blocks, v_blocks, m_blocks, states, q.chunks[2]):
                o = delayed(_local_causal)(qb, kb, vb, mb, prefix, phi, eps, chunk_size)
                outs.append(da.from_delayed(o, shape=(B, H, n, e), dtype=dtype))
                prefix = st if prefix is None else delayed(_add)(prefix, st)
            total = prefix
        out = da.concatenate(outs, axis=2)
        if not return_state:
            return out, None
        m = _feature_dim(feature_map, q.shape[3])
        S = da.from_delayed(delayed(_item)(total, 0), shape=(B, H, m, e), dtype=cdt)
        z = da.from_delayed(delayed(_item)(total, 1), shape=(B, H, m), dtype=cdt)
        return out, (S, z)


ADAPTER = DaskAdapter()


# ---------------------------------------------------------------------------
# graph construction


def _blocks(x):
    """Delayed blocks of an array chunked along axis 2 only."""
    return list(x.to_delayed()[0, 0, :, 0])


def _tree_sum(items):
    """Pairwise sums, log depth: the reduction graph stays O(len(items))."""
    while len(items) > 1:
        items = [delayed(_add)(items[i], items[i + 1]) if i + 1 < len(items) else items[i]
                 for i in range(0, len(items), 2)]
    return items[0]


def _delayed_feature_map(feature_map):
    """The map with NumPy parameters inside tasks (Dask parameters become task inputs)."""
    from kernelattn.feature_maps import FeatureMap

    if isinstance(feature_map, FeatureMap) and (feature_map.params or feature_map.buffers):
        return delayed(_numpy_map)(feature_map.spec, feature_map.params, feature_map.buffers)
    return feature_map


def _feature_dim(feature_map, d):
    m = feature_map.width(d) if hasattr(feature_map, "width") else getattr(feature_map, "feature_dim", None)
    if m is not None:
        return m
    probe = np.zeros((1, 1, 1, d), np.float32)
    return feature_map.apply(probe, role="key", xp=_np()).shape[-1]


# ---------------------------------------------------------------------------
# work inside tasks (NumPy blocks)


def _np():
    from kernelattn._compat import numpy_namespace

    return numpy_namespace()


def _numpy_map(spec, params, buffers):
    from kernelattn.feature_maps import FeatureMap

    return FeatureMap(spec, params, buffers)


def _add(a, b):
    return a[0] + b[0], a[1] + b[1]


def _item(pair, i):
    return pair[i]


def _block_state(k, v, mask, phi, cdt):
    """(phi(K_b)^T V_b, sum phi(K_b)) of one key block, padded keys left out."""
    from kernelattn._agnostic.attention import mask_keys, state_of

    xp = _np()
    fk = phi.apply(np.asarray(k, dtype=cdt), role="key", xp=xp)
    fk, vv = mask_keys(fk, np.asarray(v, dtype=cdt), None if mask is None else np.asarray(mask), xp=xp)
    return state_of(fk, vv, xp=xp)


def _readout(q, state, phi, eps, dtype):
    from kernelattn._agnostic.attention import normalise

    S, z = state
    fq = phi.apply(np.asarray(q, dtype=S.dtype), role="query", xp=_np())
    out = normalise(fq @ S, fq @ z[..., None], eps, xp=_np())
    return out.astype(dtype, copy=False)


def _local_causal(q, k, v, mask, prefix, phi, eps, chunk_size):
    import kernelattn as ka

    state = None if prefix is None else ka.LinearAttentionState(*prefix)
    return ka.linear_attention(np.asarray(q), np.asarray(k), np.asarray(v), feature_map=phi, causal=True,
                               key_mask=None if mask is None else np.asarray(mask), eps=eps,
                               chunk_size=chunk_size, initial_state=state)
