"""The JAX adapter: jit-friendly fast paths, and sequence parallelism over a device mesh.

Fast paths (chosen automatically for JAX arrays by :mod:`kernelattn._dispatch`)
-----------------------------------------------------------------------------
``linear_attention``
    * causal (``method="auto"`` or ``"chunked"``): chunked linear attention
      (exact masked products inside chunks of ``chunk_size`` tokens, the state
      between them) in a ``lax.scan`` over blocks of chunks, with a
      ``jax.custom_vjp`` whose backward pass is a reverse ``lax.scan`` carrying
      the state's gradient (:mod:`kernelattn.backends._jax_chunked`). A
      kernelattn feature map is applied inside the loop, forward and
      backward, so neither phi(Q), phi(K) nor an (N, m, e) tensor is ever
      stored: the backward pass keeps O(N (d + e)) numbers plus one state
      per block of about 256 tokens;
    * non-causal (self- or cross-attention, N != L): phi (as one batched
      product per head), then the state (S, z) = (phi(K)^T V, sum phi(K)) and
      the read-out phi(Q) S / (phi(Q) z + eps);
    * key masks act after phi; ``initial_state`` / ``return_state`` work as in
      the core; float16/bfloat16 inputs are computed in float32 with float32
      states and cast back.

    ``method="naive"`` and ``method="recurrent"`` stay on the core: they are the
    references the fast paths are tested against.
``softmax_attention``
    ``jax.nn.dot_product_attention`` (XLA on CPU, cuDNN where JAX picks it), with
    the core's convention that a query with no valid key gets zeros; values
    wider or narrower than the keys (e != d), which it does not take, go to the
    core.

Dispatch happens in Python once per trace: calling :func:`kernelattn.linear_attention`
inside ``jax.jit`` traces one ``custom_vjp`` call and nothing else of kernelattn's.

Sequence parallelism: :func:`sharded_linear_attention`
------------------------------------------------------
Splits the sequence axis of (B, H, N, d) inputs over one axis of a
:class:`jax.sharding.Mesh` with ``jax.shard_map``. Each device holds N / P
tokens and computes phi on its own tokens only:

* non-causal: every device sums its keys into (S, z); one ``psum`` over the
  mesh axis gives the global state; each device reads out its own queries;
* causal: every device sums its keys into its block state; an ``all_gather``
  of the P block states (P m (e + 1) numbers per head, independent of N)
  gives each device the exclusive prefix of the devices before it, which
  becomes the ``initial_state`` of the local chunked attention.

Communication is a few collectives of states of m (e + 1) numbers per head
and device, forward and backward (the feature map's gradients are summed over
the devices once), so the cost is compute-bound and N can grow with the number
of devices. Sequences whose length is not a multiple of P are padded with
masked keys (the padding never enters a sum) and the padded outputs dropped.

The same code runs unchanged on a multi-GPU or a multi-host mesh::

    # one process per host (for multi-host), before any other JAX call:
    jax.distributed.initialize()          # coordinator address etc. from the environment
    mesh = jax.make_mesh((jax.device_count(),), ("seq",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "seq", None))
    # each host contributes its slice of the sequence to a global array:
    q = jax.make_array_from_process_local_data(spec, q_local)   # likewise k, v
    out = sharded_linear_attention(q, k, v, mesh=mesh, axis="seq", feature_map=phi, causal=True)

On one host with 8 GPUs, ``jax.make_mesh((8,), ("seq",), ...)`` and global
arrays (or ``jax.device_put(x, spec)``) are all it takes. A 2-D mesh such as
``jax.make_mesh((2, 4), ("data", "seq"), ...)`` with ``batch_axis="data"``
combines data parallelism over the batch with sequence parallelism. The
collectives (``psum``, ``all_gather``) run over NCCL on GPUs and over the
interconnect between hosts; nothing in the code refers to the platform. Mesh
axes may be ``AxisType.Auto`` or ``Explicit`` (with explicit axes, JAX wants
the surrounding computation under ``with jax.set_mesh(mesh):`` when it mixes
the sharded output with other arrays). Called outside ``jax.jit``, the
function places its inputs on the mesh itself. Inside a jitted function every
argument must already live on the mesh's devices (that is ``jax.jit``'s rule):
a feature map built with ``like=x`` is committed to ``x``'s device, so
replicate it first with ``jax.device_put(phi, NamedSharding(mesh, P()))``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import partial_eval as _pe
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kernelattn import _validation
from kernelattn._agnostic import attention as _core
from kernelattn.backends import _jax_chunked
from kernelattn.backends._base import Adapter
from kernelattn.feature_maps import FeatureMap, as_feature_map

__all__ = ["ADAPTER", "JAXAdapter", "sharded_linear_attention"]

_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _compute_dtype(dtype):
    """float32 for half-precision inputs, else the input dtype (the core's rule)."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


# -- feature maps as pure functions of (params, x, role) ----------------------


def _apply_map(phi, x, role):
    """A kernelattn FeatureMap (a pytree) applied to ``x`` (B, H, n, d).

    The batch is folded into the token axis, (H, B n, d), so that the per-head
    weights (H, d, m) meet a batched matmul with the same batch axis: XLA's
    gradient of a broadcast (B, H, n, d) @ (H, d, m) product is 1.5-3x slower
    on CPU (measured at n = 256 ... 16384). The core's map functions act on
    the last two axes and broadcast over the head axis, so they take 3-D input.
    """
    if not phi.params and not phi.buffers:  # elementwise maps (elu, relu): nothing to fold for
        return phi.apply(x, role=role, xp=jnp)
    B, H, n, d = x.shape
    x3 = x[0] if B == 1 else jnp.reshape(jnp.swapaxes(x, 0, 1), (H, B * n, d))
    y3 = phi.apply(x3, role=role, xp=jnp)
    if B == 1:
        return y3[None]
    return jnp.swapaxes(jnp.reshape(y3, (H, B, n, y3.shape[-1])), 0, 1)


def _identity(_params, x, _role):
    """For features computed before the kernel (user callables)."""
    return x


def _phi_and_inputs(phi, q, k):
    """``(phi_fn, params, q, k)`` for the kernels.

    A :class:`~kernelattn.FeatureMap` is applied inside the kernels (its
    parameters are a pytree the custom VJP differentiates); a user callable is
    applied here, with ordinary JAX autodiff, and the kernels see features.
    """
    if isinstance(phi, FeatureMap):
        return _apply_map, phi, q, k
    return _identity, (), phi.apply(q, role="query", xp=jnp), phi.apply(k, role="key", xp=jnp)


def _key_state(phi_fn, params, k, v, key_mask):
    """(S, z) of a block of keys: phi(K)^T V (B, H, m, e) and the sum of phi(K) (B, H, m), masked after phi."""
    fk = phi_fn(params, k, "key")
    if key_mask is not None:
        keep = key_mask[:, None, :, None]
        fk = jnp.where(keep, fk, jnp.zeros_like(fk))
        v = jnp.where(keep, v, jnp.zeros_like(v))
    return jnp.swapaxes(fk, -1, -2) @ v, jnp.sum(fk, axis=-2)


def _divide(num, den, eps, plain):
    """num / (den + eps), 0 where den = 0. ``plain``: the features are >= 0 and eps > 0, so den = 0 only
    where num = 0 too and the plain quotient is already 0 there (used when nothing differentiates it:
    the core's form keeps the gradient of such a row exactly zero)."""
    return num / (den + eps) if plain else num * _jax_chunked._inverse_den(den, eps)


#: forms of kernelattn/kinds.py whose features are never negative
_NONNEGATIVE_FORMS = ("feedforward", "hedgehog", "elu", "relu", "favor")


def _readout(phi_fn, params, q, state, eps, plain=False):
    """phi(Q) S / (phi(Q) z + eps) for a state shared by every query."""
    S, z = state
    fq = phi_fn(params, q, "query")
    return _divide(fq @ S, fq @ z[..., None], eps, plain)


def _add(a, b):
    return a if b is None else (a[0] + b[0], a[1] + b[1])


def _causal_direct(phi_fn, params, q, k, v, key_mask, init, eps, plain=False):
    """Causal attention as the masked product ``tril(phi(Q) phi(K)^T) [V | 1]``: O(N^2), for N <= CAUSAL_MAX,
    where it beats the chunked scan (``asv_benchmarks/shape_targets.py``); JAX differentiates it as it is."""
    fq = phi_fn(params, q, "query")
    fk = phi_fn(params, k, "key")
    if key_mask is not None:
        keep = key_mask[:, None, :, None]
        fk = jnp.where(keep, fk, jnp.zeros_like(fk))
        v = jnp.where(keep, v, jnp.zeros_like(v))
    N = q.shape[2]
    a = jnp.where(jnp.tril(jnp.ones((N, N), dtype=bool)), fq @ jnp.swapaxes(fk, -1, -2), 0.0)
    num, den = a @ v, jnp.sum(a, axis=-1, keepdims=True)
    if init is not None:
        num, den = num + fq @ init[0], den + fq @ init[1][..., None]
    state = _add((jnp.swapaxes(fk, -1, -2) @ v, jnp.sum(fk, axis=-2)), init)
    return _divide(num, den, eps, plain), state


#: causal inputs up to this length take :func:`_causal_direct` (measured on a 2-core CPU, see above)
CAUSAL_MAX = 256


def _jit_traced_only(x) -> bool:
    """Whether ``x`` is concrete or traced by ``jax.jit`` alone (no grad, vjp or vmap tracer on top)."""
    return not isinstance(x, jax.core.Tracer) or isinstance(x, _pe.DynamicJaxprTracer)


def _all_finite(arrays):
    """One traced bool: every entry of every array is finite (a finite sum proves it; an overflowing sum
    only sends the call to the isolating branch, which is right for any input)."""
    sums = [jnp.sum(a, dtype=jnp.float32 if jnp.finfo(a.dtype).bits < 32 else a.dtype) for a in arrays]
    return jnp.isfinite(sum(sums[1:], sums[0]))


class JAXAdapter(Adapter):
    """Fast paths for JAX arrays: see the module docstring."""

    name = "jax"
    library = "jax"
    device_types = ("cpu", "cuda")
    #: the finite-input check runs inside the graph (see :meth:`_guarded`), not in kernelattn/attention.py
    isolates_inputs = True
    implementations = {
        "jax:causal-direct": f"causal, N <= {CAUSAL_MAX}: the masked product tril(phi(Q) phi(K)^T) V, JAX autodiff",
        "jax:chunked-vjp": "causal: chunks in a lax.scan with a custom_vjp reverse scan (phi inside the loop)",
        "jax:state-readout": "non-causal: phi, the state (phi(K)^T V, sum phi(K)), the read-out",
        "jax:dot-product-attention": "jax.nn.dot_product_attention",
    }

    def supports(self, op: str, *, device_type: str, dtype: str, **static) -> bool | str:
        answer = super().supports(op, device_type=device_type, dtype=dtype, **static)
        if answer is not True:
            return answer
        if dtype not in _DTYPES:
            return f"no fast path for dtype {dtype}"
        return True

    def runs_on_core(self, op: str, **static) -> str | None:
        if op == "softmax_attention" and static.get("same_width") is False:
            return "values wider or narrower than the keys (e != d): jax.nn.dot_product_attention needs e = d"
        return super().runs_on_core(op, **static)

    def choose(self, op, *, device_type, dtype, **static):
        if op == "softmax_attention":
            return "jax:dot-product-attention", self.softmax_attention, "jax fast path: jax.nn.dot_product_attention"
        if static.get("causal"):
            if static.get("length") == "short":
                return "jax:causal-direct", self._causal_short, "jax fast path: the masked product (short sequence)"
            return "jax:chunked-vjp", self._causal, "jax fast path: chunked scan with a custom VJP"
        return "jax:state-readout", self._noncausal, "jax fast path: state and read-out"

    #: the sequence-length buckets of the "length" fact (docs/_ext/support_matrix.py labels rows with them)
    lengths = {"short": f"N ≤ {CAUSAL_MAX}", "long": f"N > {CAUSAL_MAX}"}

    def facts_for(self, op, *, device_type, grad, length="long"):
        return {"length": length} if op == "linear_attention" else {}

    def facts(self, op, *, arrays, feature_map):
        if op != "linear_attention" or not arrays or getattr(arrays[0], "ndim", 0) != 4:
            return {}
        return {"length": "short" if arrays[0].shape[2] <= CAUSAL_MAX else "long"}

    # -- linear attention ------------------------------------------------------
    def linear_attention(self, q, k, v, **kw):
        """The implementation :meth:`choose` names for this call (what dispatch runs)."""
        if kw["causal"]:
            return (self._causal_short if q.shape[2] <= CAUSAL_MAX else self._causal)(q, k, v, **kw)
        return self._noncausal(q, k, v, **kw)

    def _causal(self, q, k, v, **kw):
        return self._guarded(q, k, v, direct=False, **kw)

    def _causal_short(self, q, k, v, **kw):
        return self._guarded(q, k, v, direct=True, **kw)

    def _noncausal(self, q, k, v, **kw):
        return self._guarded(q, k, v, direct=False, **kw)

    def _guarded(self, q, k, v, *, key_mask, initial_state, causal, xp, **kw):
        """Non-finite inputs kept from the outputs that must not see them (kernelattn/_agnostic/isolate.py).

        Under tracing the check is a ``lax.cond`` on whether every input is finite: the plain
        computation when it is (one reduction over the inputs), the isolating one otherwise, instead of
        isolating every call. Eager calls look at the values in Python, as the other libraries do.
        """
        from kernelattn._agnostic import isolate
        from kernelattn.attention import _isolated_inputs

        k, v = isolate.drop_padding(k, v, key_mask, xp=xp)
        state = () if initial_state is None else tuple(initial_state)
        leaves = (q, k, v, *state, *jax.tree_util.tree_leaves(kw["feature_map"]))
        differentiated = not all(_jit_traced_only(a) for a in leaves)
        # not with a caller's state: nothing makes its S vanish where its z does
        kw["plain"] = (not differentiated and kw["eps"] > 0 and initial_state is None
                       and getattr(kw["feature_map"], "form", None) in _NONNEGATIVE_FORMS)
        if not any(isinstance(a, jax.core.Tracer) for a in (q, k, v, *state)):
            q, k, v, initial_state, guard = _isolated_inputs(q, k, v, None, initial_state, causal=causal, xp=xp)
            out, st = self._attend(q, k, v, key_mask=key_mask, initial_state=initial_state, causal=causal, **kw)
            return (out, st) if guard is None else isolate.poison(out, st, *guard, xp=xp)

        def plain(args):
            q, k, v, init = args
            return self._attend(q, k, v, key_mask=key_mask, initial_state=init, causal=causal, **kw)

        def isolating(args):
            q, k, v, init, bad_rows, bad_state = isolate.isolate(*args, causal=causal, xp=xp)
            out, st = self._attend(q, k, v, key_mask=key_mask, initial_state=init, causal=causal, **kw)
            return isolate.poison(out, st, bad_rows, bad_state, xp=xp)

        init = None if initial_state is None else tuple(initial_state)
        if differentiated:
            # differentiated (or vmapped): a cond would keep the residuals of both branches, so isolate
            return isolating((q, k, v, init))
        return lax.cond(_all_finite((q, k, v, *state)), plain, isolating, (q, k, v, init))

    def _attend(self, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, method,
                initial_state, return_state, direct, plain=False):
        dtype = q.dtype
        cdt = _compute_dtype(dtype)
        q, k, v = (a.astype(cdt) for a in (q, k, v))
        phi_fn, params, q, k = _phi_and_inputs(feature_map, q, k)
        init = None if initial_state is None else tuple(s.astype(cdt) for s in initial_state)
        if causal and direct:
            out, state = _causal_direct(phi_fn, params, q, k, v, key_mask, init, eps, plain)
        elif causal:
            out, state = _jax_chunked.causal_linear_attention(
                phi_fn, params, q, k, v, key_mask=key_mask, initial_state=init, chunk_size=chunk_size, eps=eps)
        else:
            state = _add(_key_state(phi_fn, params, k, v, key_mask), init)
            out = _readout(phi_fn, params, q, state, eps, plain)
        return out.astype(dtype), (state if return_state else None)

    # -- library services (backends/_base.py) ----------------------------------
    def block(self, x):
        return x.block_until_ready()

    def jit(self, fn):
        return jax.jit(fn)

    def value_and_grad(self, loss_fn):
        return jax.jit(jax.value_and_grad(loss_fn))

    def decoder(self, dec, S, z):
        from kernelattn.backends._jax_decode import JaxDecoder

        return JaxDecoder(dec, S, z)

    def from_numpy(self, a):
        return jnp.asarray(a)

    def native_softmax(self):
        def dpa(q, k, v, causal):  # (B, H, N, d) -> the (B, T, heads, d) it takes, and back
            out = jax.nn.dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                               v.transpose(0, 2, 1, 3), is_causal=causal)
            return out.transpose(0, 2, 1, 3)

        return "jax dot_product_attention", jax.jit(dpa, static_argnums=3)

    def namespace(self):
        return jnp

    # -- softmax attention -----------------------------------------------------
    def softmax_attention(self, q, k, v, *, causal, key_mask, scale, xp):
        if v.shape[-1] != q.shape[-1]:  # dispatch sends these to the core (runs_on_core); a direct call too
            return _core.softmax_attention(q, k, v, causal=causal, key_mask=key_mask, scale=scale, xp=xp)
        dtype = q.dtype
        if _compute_dtype(dtype) != dtype and _on_cpu(q):  # the core's numerics on CPU
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        N, L = q.shape[2], k.shape[2]
        # jax.nn.dot_product_attention wants (B, T, heads, d)
        qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
        if key_mask is None:
            out = jax.nn.dot_product_attention(qt, kt, vt, scale=scale, is_causal=bool(causal))
            return jnp.swapaxes(out, 1, 2).astype(dtype)
        allowed = key_mask[:, None, None, :]
        if causal:
            allowed = allowed & jnp.tril(jnp.ones((N, L), dtype=bool))
        allowed = jnp.broadcast_to(allowed, (q.shape[0], 1, N, L))
        # a query with no valid key gets zeros: let it see every key (finite
        # values and gradients), then zero its output
        empty = ~jnp.any(allowed, axis=-1, keepdims=True)
        out = jax.nn.dot_product_attention(qt, kt, vt, mask=allowed | empty, scale=scale)
        out = jnp.swapaxes(out, 1, 2)
        return jnp.where(empty, jnp.zeros_like(out), out).astype(dtype)


def _on_cpu(x) -> bool:
    try:
        return all(d.platform == "cpu" for d in x.devices())
    except Exception:  # a tracer: ask the default backend
        return jax.default_backend() == "cpu"


ADAPTER = JAXAdapter()


# -- sequence parallelism ----------------------------------------------------------


def sharded_linear_attention(
    q, k, v, /, *,
    mesh,
    axis: str,
    feature_map="elu",
    causal: bool = False,
    key_mask=None,
    eps: float = 1e-6,
    chunk_size: int | None = None,
    initial_state=None,
    return_state: bool = False,
    batch_axis: str | None = None,
):
    """Linear attention with the sequence split over the devices of a mesh axis.

    Gives the same result as :func:`kernelattn.linear_attention` on one device
    (to rounding), forward and gradients, with each device holding and
    computing about N / P tokens, P = ``mesh.shape[axis]``. See the module
    docstring for the algorithm and for multi-GPU and multi-host meshes.

    Parameters
    ----------
    q : jax.Array, shape (B, H, N, d)
        Queries: global arrays, sharded along N or not (with a mesh of
        ``AxisType.Auto`` axes JAX reshards them as needed).
    k : jax.Array, shape (B, H, L, d)
        Keys; L may differ from N unless ``causal``.
    v : jax.Array, shape (B, H, L, e)
        Values.
    mesh : jax.sharding.Mesh
        The devices, e.g. ``jax.make_mesh((8,), ("seq",),
        axis_types=(jax.sharding.AxisType.Auto,))``.
    axis : str
        The mesh axis the sequence is split over.
    feature_map : FeatureMap, str, callable or (callable, callable), default "elu"
        As in :func:`kernelattn.linear_attention`; replicated on every device.
    causal : bool, default False
        Attend only to keys j <= i (needs N = L).
    key_mask : bool jax.Array, shape (B, L), optional
        True for a real key; padded keys never enter a sum.
    eps : float, default 1e-6
        Added to the denominator.
    chunk_size : int, optional
        Chunk length of the local causal computation (default 64).
    initial_state : LinearAttentionState, optional
        (S (B, H, m, e), z (B, H, m)) of earlier keys to continue from.
    return_state : bool, default False
        Also return the state after the last key (replicated over ``axis``).
    batch_axis : str, optional
        Another mesh axis to split the batch over (data parallelism); B must
        be a multiple of its size.

    Returns
    -------
    out : jax.Array, shape (B, H, N, e)
        In the dtype of ``q``, sharded along N over ``axis``.
    state : LinearAttentionState
        Only if ``return_state``.

    Raises
    ------
    TypeError
        If the arrays are not JAX arrays or ``mesh`` is not a Mesh.
    ValueError
        For an unknown mesh axis, a batch that does not split over
        ``batch_axis``, or the checks of :func:`kernelattn.linear_attention`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from kernelattn.backends.jax import sharded_linear_attention
    >>> mesh = jax.make_mesh((jax.device_count(),), ("seq",),
    ...                      axis_types=(jax.sharding.AxisType.Auto,))
    >>> q = k = v = jnp.ones((1, 2, 1000, 16), jnp.float32)
    >>> out = sharded_linear_attention(q, k, v, mesh=mesh, axis="seq", causal=True)
    >>> out.shape
    (1, 2, 1000, 16)
    """
    from kernelattn.attention import LinearAttentionState, _check_state, _static_checks

    named = {"q": q, "k": k, "v": v, "key_mask": key_mask}
    if initial_state is not None and isinstance(initial_state, tuple) and len(initial_state) == 2:
        named.update({"initial_state.S": initial_state[0], "initial_state.z": initial_state[1]})
    for name, a in named.items():
        if a is not None and not isinstance(a, jax.Array):
            raise TypeError(f"sharded_linear_attention needs JAX arrays; {name} is a {type(a).__name__}")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (for instance from jax.make_mesh); "
                        f"got {type(mesh).__name__}")
    for name, ax in (("axis", axis), ("batch_axis", batch_axis)):
        if ax is not None and ax not in mesh.axis_names:
            raise ValueError(f"{name}={ax!r} is not an axis of the mesh; its axes are {mesh.axis_names}")
    if batch_axis is not None:
        if batch_axis == axis:
            raise ValueError(f"batch_axis and axis must differ; both are {axis!r}")
        if getattr(q, "ndim", 0) >= 1 and q.shape[0] % mesh.shape[batch_axis]:
            raise ValueError(f"the batch B={q.shape[0]} does not split over batch_axis={batch_axis!r} "
                             f"of size {mesh.shape[batch_axis]}")
    _static_checks(eps, chunk_size, "auto")
    phi = as_feature_map(feature_map)

    def check(q, k, v, key_mask, phi_tree, initial_state):
        # on abstract values: shapes and dtypes are checked, devices are not
        # (the inputs are placed on the mesh below, wherever they are now)
        _validation.check_attention_inputs(q, k, v, key_mask=key_mask, causal=causal)
        (phi if phi_tree is None else phi_tree).check_compatible(q, name="q")
        (phi if phi_tree is None else phi_tree).check_compatible(k, name="k")
        _check_state(initial_state, q, B=q.shape[0], H=q.shape[1], e=v.shape[3])

    jax.eval_shape(check, q, k, v, key_mask, phi if isinstance(phi, FeatureMap) else None, initial_state)

    dtype = q.dtype
    cdt = _compute_dtype(dtype)
    n_dev = mesh.shape[axis]
    N, L = q.shape[2], k.shape[2]
    pad_q, pad_k = -N % n_dev, -L % n_dev
    if pad_k:
        valid = jnp.arange(L + pad_k) < L
        key_mask = (jnp.broadcast_to(valid, (k.shape[0], L + pad_k)) if key_mask is None
                    else jnp.pad(key_mask, ((0, 0), (0, pad_k))))
    q = _jax_chunked._pad_tokens(q.astype(cdt), pad_q)
    k, v = (_jax_chunked._pad_tokens(a.astype(cdt), pad_k) for a in (k, v))
    if isinstance(phi, FeatureMap):
        params, fns = phi, None
    else:  # user callables: static, applied on each device
        params, fns = None, (phi.query_fn, phi.key_fn)
    # Place every input on the mesh (a no-op for inputs already there): arrays
    # committed to one device, such as a feature map built with like=q, would
    # otherwise clash with the mesh's devices.
    tokens = NamedSharding(mesh, P(batch_axis, None, axis, None))
    q, k, v = jax.device_put((q, k, v), tokens)
    if key_mask is not None:
        key_mask = jax.device_put(key_mask, NamedSharding(mesh, P(batch_axis, axis)))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    state = None if initial_state is None else tuple(a.astype(cdt) for a in initial_state)
    if state is not None:
        state = jax.device_put(state, NamedSharding(mesh, P(batch_axis)))
    out, final = _sharded(q, k, v, key_mask, params, state, fns=fns, mesh=mesh,
                       axis=axis, batch_axis=batch_axis, causal=bool(causal), eps=float(eps),
                       chunk_size=64 if chunk_size is None else int(chunk_size))
    if pad_q:
        if any(t == AxisType.Explicit for t in mesh.axis_types):
            # an explicitly sharded array cannot be cut to a length the devices do not divide
            out = jax.reshard(out, NamedSharding(mesh, P(batch_axis, None, None, None)))
        out = out[:, :, :N]
    out = out.astype(dtype)
    if return_state:
        return out, LinearAttentionState(*final)
    return out


@partial(jax.jit, static_argnames=("fns", "mesh", "axis", "batch_axis", "causal", "eps", "chunk_size"))
def _sharded(q, k, v, key_mask, params, state, *, fns, mesh, axis, batch_axis, causal, eps, chunk_size):
    tokens = P(batch_axis, None, axis, None)
    batch_only = P(batch_axis)
    in_specs = (tokens, tokens, tokens, None if key_mask is None else P(batch_axis, axis),
                P(), None if state is None else batch_only)
    local = partial(_local, fns=fns, axis=axis, causal=causal, eps=eps, chunk_size=chunk_size)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(tokens, batch_only))(
        q, k, v, key_mask, params, state)


def _local(q, k, v, key_mask, params, state, *, fns, axis, causal, eps, chunk_size):
    """One device's part: (B_local, H, N / P, d) blocks of q, k, v."""
    if fns is None:
        phi_fn = _apply_map
    else:
        phi_fn, params = _identity, ()
        q, k = fns[0](q), fns[1](k)
    own = _key_state_checkpointed(phi_fn, params, k, v, key_mask)
    total = _add(lax.psum(own, axis), state)  # the same on every device
    if not causal:
        return _readout(phi_fn, params, q, total, eps), total
    # causal: the exclusive prefix over the devices before this one, then local chunks
    blocks = lax.all_gather(own, axis)  # (P, B, H, m, e) and (P, B, H, m)
    before = jnp.arange(blocks[0].shape[0]) < lax.axis_index(axis)
    prefix = tuple(jnp.tensordot(before.astype(b.dtype), b, axes=1) for b in blocks)
    out, _ = _jax_chunked.causal_linear_attention(
        phi_fn, params, q, k, v, key_mask=key_mask, initial_state=_add(prefix, state),
        chunk_size=chunk_size, eps=eps)
    return out, total


#: the keys' state of a device, recomputed in the backward pass instead of storing phi(K)
_key_state_checkpointed = jax.checkpoint(_key_state, static_argnums=(0,))


# Importing this module means JAX is in use: make FeatureMap a pytree.
import kernelattn.feature_maps as _feature_maps  # noqa: E402


def _register_pytrees() -> None:
    """FeatureMap as a JAX pytree: its arrays are the leaves, its spec the static part."""
    if _feature_maps._PYTREES_REGISTERED:
        return

    def flatten(phi):
        return (phi.params, phi.buffers), phi.spec

    def unflatten(spec, children):
        phi = object.__new__(FeatureMap)
        phi.spec = spec
        phi.params, phi.buffers = children
        return phi

    jax.tree_util.register_pytree_node(FeatureMap, flatten, unflatten)
    _feature_maps._PYTREES_REGISTERED = True


_register_pytrees()
