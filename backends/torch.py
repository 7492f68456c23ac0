"""The torch adapter: fast paths chosen automatically for torch tensors.

``linear_attention``
    * no autograd needed (inference, ``torch.no_grad``), eager mode, a
      kernelattn feature map: the *fused* form. phi is applied block by block
      of tokens inside the attention loop, so phi(Q) and phi(K) never exist in
      full and every temporary stays in cache
      (:func:`kernelattn.backends._torch_ops.forward_fused`);
    * otherwise (training, ``torch.compile``, user callables): phi with torch
      ops (autograd through its parameters), then the custom op
      ``kernelattn::attend`` -- blocked forward, and for causal attention a
      backward that recomputes block by block in reverse and keeps O(N) memory;
    * on CUDA with Triton installed, the Triton kernels of
      :mod:`kernelattn.backends._triton_linear`.

    Half-precision inputs are computed in float32 with float32 states, as the
    core does. ``method="naive"`` and ``method="recurrent"`` stay on the core:
    they are the references the fast paths are tested against.
``softmax_attention``
    ``torch.nn.functional.scaled_dot_product_attention`` with the core's
    conventions (a query with no valid key gets zeros).

Importing this module defines two custom ops and nothing from ``torch.nn``
beyond ``functional``; the modules live in :mod:`kernelattn.backends.torch_nn`.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from kernelattn import kinds
from kernelattn.backends import _torch_fmap as fmaps
from kernelattn.backends import _torch_ops as ops
from kernelattn.backends._base import Adapter

_DTYPES = ("float16", "bfloat16", "float32", "float64")  # bare names: kernelattn/_dispatch.py strips "torch."
_HALF = (torch.float16, torch.bfloat16)
#: the direct formula (backends/_torch_direct.py) runs on the CPU up to these lengths (N and L): measured
#: against the blocked/fused paths with asv_benchmarks/shape_targets.py on a 2-core CPU; the causal form is
#: O(N^2), so its limit is lower
DIRECT_MAX = 2048
CAUSAL_MAX = 256
#: "0" keeps CUDA tensors off the Triton kernels (they then take the blocked torch path); "force" sends
#: every device to them (for tests on CPU under TRITON_INTERPRET=1)
TRITON_ENV = "KERNELATTN_TORCH_TRITON"


def _compute_dtype(dtype):
    return torch.float32 if dtype in _HALF else dtype


_TRITON_IMPORTS: list = []  # [True] or [False] once the Triton kernels' module was tried


def _triton_ready(device_type: str) -> bool:
    setting = os.environ.get(TRITON_ENV, "1").strip().lower()
    if setting == "0" or (device_type != "cuda" and setting != "force"):
        return False
    if not _TRITON_IMPORTS:  # tried once: a failed import is not retried on every call
        try:
            from kernelattn.backends import _triton_linear  # noqa: F401
        except Exception:  # triton missing or broken: the torch path runs instead
            _TRITON_IMPORTS.append(False)
        else:
            _TRITON_IMPORTS.append(True)
    return _TRITON_IMPORTS[0]


def _length(arrays) -> str:
    """"short", "medium" or "long": the bucket of the longest of N and L (q and k are arrays[0:2])."""
    n = 0
    for a in arrays[:2]:  # a plain loop: torch.compile traces this (no max() over a generator)
        if a is not None and a.ndim == 4 and a.shape[2] > n:
            n = a.shape[2]
    return "short" if n <= CAUSAL_MAX else "medium" if n <= DIRECT_MAX else "long"


def _needs_grad(phi, tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and getattr(t, "requires_grad", False) for t in tensors):
        return True
    params = phi.parameters() + list(getattr(phi, "buffers", {}).values()) if hasattr(phi, "parameters") else []
    return any(getattr(p, "requires_grad", False) for p in params)


class TorchAdapter(Adapter):
    """Fast paths for torch tensors (CPU blocked forms, Triton on CUDA, SDPA for softmax)."""

    name = "torch"
    library = "torch"
    feature_forms = tuple(fmaps.FORMS)
    device_types = ("cpu", "cuda")
    implementations = {
        "torch:direct": "the formula in whole-tensor ops (CPU, short and medium sequences; causal: the masked "
                        "O(N^2) product), autograd through it",
        "torch:fused-blocks": "phi applied block by block inside the attention loop (no autograd, CPU; "
                              "inside torch.compile the custom op runs instead)",
        "torch:custom-op": "phi with torch ops, then the kernelattn::attend custom op (autograd, torch.compile)",
        "torch:triton": "phi with torch ops, then the Triton kernels (CUDA; inside torch.compile the custom op)",
        "torch:sdpa": "torch.nn.functional.scaled_dot_product_attention",
    }

    #: the sequence-length buckets of the "length" fact (docs/_ext/support_matrix.py labels rows with them)
    lengths = {"short": f"max(N, L) ≤ {CAUSAL_MAX}", "medium": f"{CAUSAL_MAX} < max(N, L) ≤ {DIRECT_MAX}",
               "long": f"max(N, L) > {DIRECT_MAX}"}

    def supports(self, op: str, *, device_type: str, dtype: str, **static) -> bool | str:
        answer = super().supports(op, device_type=device_type, dtype=dtype, **static)
        if answer is not True:
            return answer
        if device_type not in ("cpu", "cuda"):
            return f"no fast path for device type {device_type!r}"
        if dtype not in _DTYPES:
            return f"no fast path for dtype {dtype}"
        return True

    def facts(self, op, *, arrays, feature_map):
        if op != "linear_attention":
            return {}
        device = next((a.device for a in arrays if a is not None), None)
        # the same facts eager and under torch.compile (dispatch caches on them; torch.compile cannot see
        # a decision first taken while it traces): the compiled graph takes the custom op, see _compiled
        return {"grad": _needs_grad(feature_map, arrays), "triton": _triton_ready("cpu" if device is None else device.type),
                "length": _length(arrays)}

    def call_key(self, q, k, v, key_mask, state, feature_map):
        """What validation and :meth:`facts` read from a linear_attention call's arrays, as a hashable key
        (kernelattn/attention.py's call cache); None where values cannot be looked at or for subclasses."""
        T = torch.Tensor
        if type(q) is not T or type(k) is not T or type(v) is not T or torch.compiler.is_compiling():
            return None
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor
        if wrapped(q) or wrapped(k) or wrapped(v):
            return None
        grad = torch.is_grad_enabled()
        flags = None
        if grad:
            params = feature_map.parameters() if hasattr(feature_map, "parameters") else ()
            flags = (q.requires_grad, k.requires_grad, v.requires_grad,
                     *(getattr(p, "requires_grad", None) for p in params))  # (a map of another library: refused later)
        mask = None
        if key_mask is not None:
            if type(key_mask) is not T:
                return None
            mask = (key_mask.shape, key_mask.dtype, key_mask.device)
        st = None
        if state is not None:
            if not isinstance(state, tuple) or len(state) != 2 or any(type(a) is not T for a in state):
                return None
            st = tuple((a.shape, a.dtype, a.device, a.requires_grad) for a in state)
        return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, flags, mask,
                st, os.environ.get(TRITON_ENV), _length((q, k)))

    def facts_for(self, op, *, device_type, grad, length="long"):
        return {} if op != "linear_attention" else {"grad": bool(grad), "triton": _triton_ready(device_type),
                                                     "length": length}

    def choose(self, op, *, device_type, dtype, **static):
        if op == "softmax_attention":
            return "torch:sdpa", self.softmax_attention, "torch fast path: SDPA"
        if static.get("triton"):
            return "torch:triton", self._attend_triton, "torch fast path on CUDA with Triton"
        length = static.get("length", "long")
        if device_type == "cpu" and (length == "short" or (length == "medium" and not static.get("causal"))):
            return "torch:direct", self._attend_direct, f"torch fast path: the direct formula ({length} sequence)"
        form = getattr(kinds.get(static.get("kind")), "form", None)
        why = ("gradients are needed" if static.get("grad", False) else f"not on the CPU ({device_type})"
               if device_type != "cpu" else f"kind {static.get('kind')!r} has no torch form"
               if form not in fmaps.FORMS else None)
        if why is None:
            return "torch:fused-blocks", self._attend_fused, "torch fast path: fused blocks (no gradient needed)"
        return "torch:custom-op", self._attend_custom_op, f"torch fast path: custom op ({why})"

    # -- linear attention ----------------------------------------------------
    def linear_attention(self, q, k, v, **kw):
        """The implementation :meth:`choose` names for this call (what dispatch runs)."""
        phi = kw["feature_map"]
        facts = self.facts("linear_attention", arrays=(q, k, v, *(kw["initial_state"] or ())), feature_map=phi)
        _, fn, _ = self.choose("linear_attention", device_type=q.device.type, dtype=str(q.dtype).rsplit(".", 1)[-1],
                               kind=getattr(phi, "kind", "callable"), **facts)
        return fn(q, k, v, **kw)

    @staticmethod
    def _state(initial_state, cdt):
        if initial_state is None:
            return None
        S0, z0 = initial_state
        return torch.cat([S0.to(cdt), z0.to(cdt).unsqueeze(-1)], dim=-1)

    @staticmethod
    def _split(out, S, e, return_state):
        return out, ((S[..., :e], S[..., e]) if return_state else None)

    def _attend_fused(self, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, method, initial_state,
                      return_state, xp):
        if torch.compiler.is_compiling():  # the fused loop is eager code (it reads values): the op traces
            return self._attend_custom_op(q, k, v, feature_map=feature_map, causal=causal, key_mask=key_mask,
                                          eps=eps, chunk_size=chunk_size, method=method,
                                          initial_state=initial_state, return_state=return_state, xp=xp)
        cdt = _compute_dtype(q.dtype)
        out, S = self._fused(q, k, v, feature_map, causal=causal, key_mask=key_mask, eps=eps, chunk=chunk_size,
                             state=self._state(initial_state, cdt), cdt=cdt)
        return self._split(out, S, v.shape[-1], return_state)

    @staticmethod
    def _features(q, k, v, phi, key_mask, cdt):
        fq = fmaps.apply(phi, q.to(cdt), role="query")
        fk = fmaps.apply(phi, k.to(cdt), role="key")
        vc = v.to(cdt)
        if key_mask is not None:
            keep = key_mask[:, None, :, None]
            fk = torch.where(keep, fk, 0.0)
            vc = torch.where(keep, vc, 0.0)
        return fq.to(cdt).contiguous(), fk.to(cdt).contiguous(), vc.contiguous()

    def _attend_direct(self, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, method, initial_state,
                       return_state, xp):
        from kernelattn.backends import _torch_direct

        return _torch_direct.attend(q, k, v, feature_map, causal=causal, key_mask=key_mask, eps=eps,
                                    state=initial_state, return_state=return_state,
                                    grad=_needs_grad(feature_map, (q, k, v, *(initial_state or ()))),
                                    cdt=_compute_dtype(q.dtype))

    def _attend_custom_op(self, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, method, initial_state,
                          return_state, xp):
        cdt = _compute_dtype(q.dtype)
        fq, fk, vc = self._features(q, k, v, feature_map, key_mask, cdt)
        out, S, _ = ops.attend(fq, fk, vc, self._state(initial_state, cdt), causal, float(eps), int(chunk_size))
        return self._split(out.to(q.dtype), S, v.shape[-1], return_state)

    def _attend_triton(self, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, method, initial_state,
                       return_state, xp):
        if torch.compiler.is_compiling():  # the Triton launch is eager code: under torch.compile the op traces
            return self._attend_custom_op(q, k, v, feature_map=feature_map, causal=causal, key_mask=key_mask,
                                          eps=eps, chunk_size=chunk_size, method=method,
                                          initial_state=initial_state, return_state=return_state, xp=xp)
        from kernelattn.backends import _triton_linear

        cdt = _compute_dtype(q.dtype)
        fq, fk, vc = self._features(q, k, v, feature_map, key_mask, cdt)
        if q.device.type == "cuda" and q.dtype in _HALF:  # tensor-core products, float32 sums
            fq, fk, vc = fq.to(q.dtype), fk.to(q.dtype), v.to(q.dtype)
            if key_mask is not None:
                vc = torch.where(key_mask[:, None, :, None], vc, 0.0)
        out, S = _triton_linear.attend(fq, fk, vc, self._state(initial_state, cdt), causal=causal, eps=eps,
                                       chunk=chunk_size)
        return self._split(out.to(q.dtype), S, v.shape[-1], return_state)

    @staticmethod
    def _fused(q, k, v, phi, *, causal, key_mask, eps, chunk, state, cdt):
        B = q.shape[0]
        expanded = {}

        def fmap(x, role):
            if role not in expanded:
                expanded[role] = fmaps.expand_blocks(phi.blocks(role), B, cdt)
            return fmaps.apply(phi, x, role=role, blocks=expanded[role], inplace=True)

        m = fmaps.feature_dim(phi, q.shape[-1])
        if m is None:
            m = fmap(q[:, :, :0].to(cdt), "query").shape[-1]
        return ops.forward_fused(q, k, v, fmap=fmap, m=m, causal=causal, eps=eps, chunk=chunk, state=state,
                                 keep=key_mask, compute_dtype=cdt,
                                 nonnegative=getattr(phi, "form", None) in fmaps.NONNEGATIVE_FORMS)

    # -- library services (backends/_base.py) ----------------------------------
    def block(self, x):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return x

    def value_and_grad(self, loss_fn):
        from kernelattn import _tree

        def step(phi, *args):
            leaves = [p.detach().requires_grad_(True) for p in phi.parameters()]
            with torch.enable_grad():
                value = loss_fn(phi.replace(params=_tree.with_leaves(phi.params, leaves)), *args)
                grads = torch.autograd.grad(value, leaves)
            return value.detach(), phi.replace(params=_tree.with_leaves(phi.params, list(grads)))

        return step

    def decoder(self, dec, S, z):
        from kernelattn.backends._torch_decode import TorchDecoder

        return TorchDecoder(dec, S, z)

    def from_numpy(self, a):
        return torch.from_numpy(a)

    def namespace(self):
        import array_api_compat.torch as xp

        return xp

    def inference(self):
        torch.set_grad_enabled(False)

    def native_softmax(self):
        return "torch SDPA", lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    @contextlib.contextmanager
    def threads(self, n):
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    # -- softmax attention ---------------------------------------------------
    def softmax_attention(self, q, k, v, *, causal, key_mask, scale, xp):
        dtype = q.dtype
        if q.device.type == "cpu" and dtype in _HALF:  # the core's numerics: float32 inside
            q, k, v = q.float(), k.float(), v.float()
        if key_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal), scale=scale)
            return out.to(dtype)
        N, L = q.shape[2], k.shape[2]
        allowed = key_mask[:, None, None, :]  # (B, 1, 1, L)
        if causal:
            allowed = allowed & torch.ones(N, L, dtype=torch.bool, device=q.device).tril()
        else:
            allowed = allowed.expand(-1, 1, N, L)
        # a query with no valid key gets zeros: let it see every key (finite values
        # and gradients), then zero its output
        empty = ~allowed.any(dim=-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, scale=scale)
        return torch.where(empty, 0.0, out).to(dtype)


ADAPTER = TorchAdapter()
