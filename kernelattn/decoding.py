"""Fast token-by-token decoding: a step object bound to a feature map.

:func:`~kernelattn.linear_attention_step` checks, dispatches and allocates on
every call. :class:`LinearAttentionDecoder` does that once, at construction,
and then each :meth:`~LinearAttentionDecoder.step` costs the feature map on
one token and the state update: in place in torch (when autograd is not
recording) and NumPy, a jit-compiled step with donated state in JAX, and the
array-API form for every other library. The torch and JAX steps live with
their adapters (``backends/_torch_decode.py``, ``backends/_jax_decode.py``).
:func:`decode_step` is the pure function underneath (no checks, no mutation), for ``jax.grad`` and friends.
"""

from __future__ import annotations

from . import _compat, _dispatch, _validation
from ._agnostic._utils import cast, compute_dtype
from ._agnostic.attention import normalise
from .attention import LinearAttentionState
from .feature_maps import as_feature_map

__all__ = ["LinearAttentionDecoder", "decode_step"]


def _features(phi, q, k, *, xp):
    """phi(q), phi(k) of (B, H, d) tokens in the compute dtype: (B, H, m) each.

    A tied map sees q and k stacked, so each block is one matmul for both.
    """
    if getattr(phi, "tied", False) or getattr(phi, "key_fn", None) is getattr(phi, "query_fn", 0):
        f = phi.apply(xp.stack((q, k), axis=2), role="query", xp=xp)
        return f[:, :, 0, :], f[:, :, 1, :]
    return (phi.apply(q[:, :, None, :], role="query", xp=xp)[:, :, 0, :],
            phi.apply(k[:, :, None, :], role="key", xp=xp)[:, :, 0, :])


def decode_step(phi, S, z, q, k, v, key_mask=None, *, eps=1e-6):
    """One causal decoding step as a pure function: ``(out, S, z)``.

    The math of :func:`~kernelattn.linear_attention_step` on one token, with
    no checks and no mutation, in any array-API library (differentiable by
    torch autograd and ``jax.grad``; ``jax.jit`` it as it is).

    Parameters
    ----------
    phi : FeatureMap (or what ``linear_attention(feature_map=...)`` takes, already normalised)
    S : array, shape (B, H, m, e)
    z : array, shape (B, H, m)
        The state, in the compute dtype (float32 for half-precision inputs).
    q, k : array, shape (B, H, d)
    v : array, shape (B, H, e)
    key_mask : bool array, shape (B,), optional
        False: the token is padding and does not enter the state.
    eps : float, default 1e-6

    Returns
    -------
    out : array, shape (B, H, e), in q's dtype
    S, z : the state after the token
    """
    xp = _compat.array_namespace(q)
    dtype = q.dtype
    cdt = S.dtype
    q, k, v = (cast(a, cdt, xp=xp) for a in (q, k, v))
    fq, fk = _features(phi, q, k, xp=xp)
    if key_mask is not None:
        keep = key_mask[:, None, None]
        fk = xp.where(keep, fk, xp.zeros_like(fk))
        v = xp.where(keep, v, xp.zeros_like(v))
    S = S + fk[..., :, None] * v[..., None, :]
    z = z + fk
    num = xp.matmul(fq[..., None, :], S)[..., 0, :]
    den = xp.sum(fq * z, axis=-1, keepdims=True)
    return cast(normalise(num, den, eps, xp=xp), dtype, xp=xp), S, z


class LinearAttentionDecoder:
    """Causal linear attention one token at a time, bound to ``feature_map``.

    Everything :func:`~kernelattn.linear_attention_step` checks per call
    (phi against H and d, dtype, library, device, the state) is checked
    here, once; :meth:`step` then checks nothing, so pass it arrays like
    the ones the decoder was built for.

    Parameters
    ----------
    feature_map : FeatureMap, str, callable or (callable, callable)
        phi, as in :func:`~kernelattn.linear_attention`.
    batch : int, optional
        B; default ``like.shape[0]`` or the state's.
    like : array, shape (B, H, d)
        A query token: its library, device, dtype, H and d. Optional when
        ``state`` is given (then the state's dtype is the input dtype).
    value_dim : int, optional
        e; needed without ``state``.
    state : LinearAttentionState, optional
        Start from it (for instance the state of
        ``linear_attention(prompt..., causal=True, return_state=True)``);
        it is copied, never changed. Default: empty.
    eps : float, default 1e-6

    Examples
    --------
    >>> import numpy as np, kernelattn as ka
    >>> q, k, v = np.random.default_rng(0).standard_normal((3, 1, 2, 6, 4))
    >>> _, state = ka.linear_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3], causal=True,
    ...                                return_state=True)
    >>> dec = ka.LinearAttentionDecoder("elu", like=q[:, :, 0], state=state)
    >>> outs = [dec.step(q[:, :, t], k[:, :, t], v[:, :, t]) for t in range(3, 6)]
    >>> full = ka.linear_attention(q, k, v, causal=True)
    >>> bool(np.allclose(np.stack(outs, axis=2), full[:, :, 3:]))
    True
    """

    #: the pure step ``(phi, S, z, q, k, v, key_mask=None, *, eps) -> (out, S, z)``
    step_fn = staticmethod(decode_step)

    def __init__(self, feature_map="elu", *, batch=None, like=None, value_dim=None, state=None,
                 eps: float = 1e-6):
        self.eps = _validation.nonnegative("eps", eps)
        phi = as_feature_map(feature_map)
        if like is None and state is None:
            raise TypeError("LinearAttentionDecoder needs like=<a (B, H, d) query token> or state=")
        ref = like if like is not None else state[0]
        _validation.array("like" if like is not None else "state.S", ref)
        xp = _compat.array_namespace(ref)
        _validation.real_floating(xp, "like", ref)
        if like is not None:
            _validation.check_ndim("like", like, 3, "(B, H, d)")
            B, H, d = like.shape
        else:
            B, H = state[0].shape[0], state[0].shape[1]
            d = phi.head_dim if getattr(phi, "head_dim", None) is not None else None
        if batch is not None:
            batch = _validation.integer("batch", batch)
            if batch != B:
                raise ValueError(f"batch={batch} but like/state has B={B}")
        if state is not None:
            e = state[0].shape[3] if state[0].ndim == 4 else None
            if value_dim is not None and _validation.integer("value_dim", value_dim) != e:
                raise ValueError(f"value_dim={value_dim} but state.S has e={e}")
        elif value_dim is None:
            raise TypeError("LinearAttentionDecoder needs value_dim=e (or state=)")
        else:
            e = _validation.integer("value_dim", value_dim)
        self.dtype = ref.dtype
        cdt = compute_dtype(ref.dtype, xp=xp)
        device = _compat.device(ref)
        if d is None:
            raise TypeError(f"give like=<a (B, H, d) query token> to decode with feature map {phi.kind!r}")
        probe = xp.zeros((B, H, 1, d), dtype=ref.dtype, device=device)
        phi.check_compatible(probe, name="q")
        m = _validation.feature_size(phi, probe)
        if m is None:  # a callable: run it once for its width (and its checks)
            m = phi.apply(cast(probe, cdt, xp=xp), role="query", xp=xp).shape[-1]
        if state is not None:
            _validation.check_state(tuple(state), probe, B=B, H=H, e=e, m=m)
        self.phi, self.xp = phi, xp
        self.batch, self.num_heads, self.head_dim, self.feature_dim, self.value_dim = B, H, d, m, e
        if state is None:
            S = xp.zeros((B, H, m, e), dtype=cdt, device=device)
            z = xp.zeros((B, H, m), dtype=cdt, device=device)
        else:
            S, z = (cast(a, cdt, xp=xp) for a in state)
        # a library's own step comes from its adapter (backends/); NumPy and the rest are here
        adapter = _dispatch.adapter_for(_compat.library_name(xp))
        self._impl = None if adapter is None else adapter.decoder(self, S, z)
        if self._impl is not None:
            self._step = self._impl._step
        else:
            (self._init_numpy if _compat.is_numpy_namespace(xp) else self._init_generic)(S, z)

    # -- the state ------------------------------------------------------------
    @property
    def state(self) -> LinearAttentionState:
        """The running sums (S (B, H, m, e), z (B, H, m)) after the tokens seen so far."""
        if self._impl is not None:
            return LinearAttentionState(*self._impl.state())
        return LinearAttentionState(self._S, self._z)

    def step(self, q, k, v, key_mask=None):
        """Attend one token (B, H, d), (B, H, d), (B, H, e) to all before it and itself.

        ``key_mask`` (B,) bool: False marks a padding token, which does not
        enter the state. Returns (B, H, e) in the input dtype.
        """
        return self._step(q, k, v, key_mask)

    __call__ = step

    # -- numpy: in-place ufuncs ----------------------------------------------------
    def _init_numpy(self, S, z):
        import numpy as np

        self._S, self._z = np.array(S, copy=True), np.array(z, copy=True)
        self._np = np
        self._step = self._step_numpy

    def _step_numpy(self, q, k, v, key_mask):
        np, S, z = self._np, self._S, self._z
        cdt = S.dtype
        q, k, v = (cast(a, cdt, xp=self.xp) for a in (q, k, v))
        fq, fk = _features(self.phi, q, k, xp=self.xp)
        if key_mask is not None:
            keep = np.asarray(key_mask)[:, None, None]
            fk = np.where(keep, fk, 0.0)
            v = np.where(keep, v, 0.0)
        np.add(S, fk[..., :, None] * v[..., None, :], out=S)
        np.add(z, fk, out=z)
        num = np.matmul(fq[..., None, :], S)[..., 0, :]
        den = np.einsum("bhm,bhm->bh", fq, z)[..., None]
        ok = den != 0
        np.add(den, self.eps, out=den)
        np.divide(num, den, out=num, where=ok)
        np.copyto(num, 0.0, where=~ok)
        return num if num.dtype == self.dtype else num.astype(self.dtype)

    # -- any other array-API library: the pure step ---------------------------------
    def _init_generic(self, S, z):
        self._S, self._z = S, z
        self._step = self._step_generic

    def _step_generic(self, q, k, v, key_mask):
        out, self._S, self._z = decode_step(self.phi, self._S, self._z, q, k, v, key_mask, eps=self.eps)
        return out
