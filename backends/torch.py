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

import os

import torch
import torch.nn.functional as F

from kernelattn.backends import _torch_fmap as fmaps
from kernelattn.backends import _torch_ops as ops
from kernelattn.backends._base import Adapter

_DTYPES = ("float16", "bfloat16", "float32", "float64")  # bare names: kernelattn/_dispatch.py strips "torch."
_HALF = (torch.float16, torch.bfloat16)
#: "0" keeps CUDA tensors off the Triton kernels (they then take the blocked torch path); "force" sends
#: every device to them (for tests on CPU under TRITON_INTERPRET=1)
TRITON_ENV = "KERNELATTN_TORCH_TRITON"


def _compute_dtype(dtype):
    return torch.float32 if dtype in _HALF else dtype


def _triton_ready(device) -> bool:
    setting = os.environ.get(TRITON_ENV, "1").strip().lower()
    if setting == "0" or (device.type != "cuda" and setting != "force") or torch.compiler.is_compiling():
        return False
    try:
        from kernelattn.backends import _triton_linear  # noqa: F401
    except Exception:  # triton missing or broken: the torch path runs instead
        return False
    return True


def _needs_grad(phi, tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    if any(t is not None and t.requires_grad for t in tensors):
        return True
    params = phi.parameters() + list(getattr(phi, "buffers", {}).values()) if hasattr(phi, "parameters") else []
    return any(getattr(p, "requires_grad", False) for p in params)


class TorchAdapter(Adapter):
    """Fast paths for torch tensors (CPU blocked forms, Triton on CUDA, SDPA for softmax)."""

    name = "torch"
    library = "torch"
    feature_forms = tuple(fmaps.FORMS)

    def supports(self, op: str, *, device_type: str, dtype: str, **static) -> bool | str:
        answer = super().supports(op, device_type=device_type, dtype=dtype, **static)
        if answer is not True:
            return answer
        if device_type not in ("cpu", "cuda"):
            return f"no fast path for device type {device_type!r}"
        if dtype not in _DTYPES:
            return f"no fast path for dtype {dtype}"
        return True

    # -- linear attention ----------------------------------------------------
    def linear_attention(self, q, k, v, *, feature_map, causal, key_mask, eps, chunk_size, method,
                         initial_state, return_state, xp):
        phi = feature_map
        cdt = _compute_dtype(q.dtype)
        e = v.shape[-1]
        state = None
        if initial_state is not None:
            S0, z0 = initial_state
            state = torch.cat([S0.to(cdt), z0.to(cdt).unsqueeze(-1)], dim=-1)
        known = getattr(phi, "form", None) in fmaps.FORMS  # a kind with a torch form (kernelattn/kinds.py)
        grad = _needs_grad(phi, (q, k, v, state))
        triton = _triton_ready(q.device)
        if known and not grad and not triton and not torch.compiler.is_compiling() and q.device.type == "cpu":
            out, S = self._fused(q, k, v, phi, causal=causal, key_mask=key_mask, eps=eps, chunk=chunk_size,
                                 state=state, cdt=cdt)
        else:
            fq = fmaps.apply(phi, q.to(cdt), role="query")
            fk = fmaps.apply(phi, k.to(cdt), role="key")
            vc = v.to(cdt)
            if key_mask is not None:
                keep = key_mask[:, None, :, None]
                fk = torch.where(keep, fk, 0.0)
                vc = torch.where(keep, vc, 0.0)
            fq, fk, vc = fq.to(cdt).contiguous(), fk.to(cdt).contiguous(), vc.contiguous()
            if triton:
                from kernelattn.backends import _triton_linear

                if q.device.type == "cuda" and q.dtype in _HALF:  # tensor-core products, float32 sums
                    fq, fk, vc = fq.to(q.dtype), fk.to(q.dtype), v.to(q.dtype)
                    if key_mask is not None:
                        vc = torch.where(key_mask[:, None, :, None], vc, 0.0)
                out, S = _triton_linear.attend(fq, fk, vc, state, causal=causal, eps=eps, chunk=chunk_size)
            else:
                out, S, _ = ops.attend(fq, fk, vc, state, causal, float(eps), int(chunk_size))
            out = out.to(q.dtype)
        if not return_state:
            return out, None
        return out, (S[..., :e], S[..., e])

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
                                 keep=key_mask, compute_dtype=cdt)

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
