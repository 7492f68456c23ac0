"""The torch decoder step (see kernelattn/decoding.py): S and z as one (B*H, m, e + 1) buffer, in place.

:meth:`kernelattn.backends.torch.TorchAdapter.decoder` builds a
:class:`TorchDecoder` for :class:`kernelattn.LinearAttentionDecoder`; the
decoder's checks are done by then, so a step checks nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernelattn.backends._torch_fmap import NONNEGATIVE_FORMS
from kernelattn.decoding import _features

_FIELDS = ("phi", "xp", "eps", "dtype", "batch", "num_heads", "feature_dim", "value_dim")


class TorchDecoder:
    """The library half of a LinearAttentionDecoder on torch tensors."""

    def __init__(self, dec, S, z):
        for name in _FIELDS:
            setattr(self, name, getattr(dec, name))
        self._init_torch(S, z)

    def state(self):
        e = self.value_dim
        Sz = self._Sz.view(self.batch, self.num_heads, self.feature_dim, e + 1)
        return Sz[..., :e], Sz[..., e]

    # -- torch: S and z as one (B*H, m, e + 1) buffer, updated in place ---------------
    def _init_torch(self, S, z):
        self._torch, self._F = torch, F
        B, H, m, e = self.batch, self.num_heads, self.feature_dim, self.value_dim
        # z rides as S's last column: one baddbmm updates both, one bmm reads num and den
        self._Sz = torch.cat((S, z[..., None]), dim=-1).reshape(B * H, m, e + 1)
        self._vbuf = torch.ones((B * H, 1, e + 1), dtype=S.dtype, device=S.device)
        self._vbuf_masked = False
        phi = self.phi
        self._blocks = None
        # forms of kernelattn/kinds.py written out below for one token
        if getattr(phi, "form", None) == "feedforward" and phi.tied:
            self._blocks = phi.blocks("query")
        self._params = tuple(phi.parameters()) if hasattr(phi, "parameters") else ()
        # every built-in form is >= 0, so den = 0 only where z = 0, and then num = 0 too: with eps > 0,
        # num / (den + eps) is already the core's "zeros where den = 0" (two ops fewer per token)
        self._plain_divide = getattr(phi, "form", None) in NONNEGATIVE_FORMS and self.eps > 0
        self._step = self._step_torch

    def _phi_torch(self, x):
        # x (B, H, n, d) in the compute dtype -> (B, H, n, m)
        phi, F = self.phi, self._F
        if self._blocks is None:
            if getattr(phi, "form", None) == "elu":
                return F.elu(x) + 1.0
            return phi.apply(x, role="query", xp=self.xp)
        mm = self._torch.matmul
        if x.shape[0] == 1:  # B = 1: a plain bmm over heads, no broadcast of the weights
            x = x[0]
            mm = self._torch.bmm
        last = len(self._blocks) - 1
        for i, blk in enumerate(self._blocks):
            W = blk["W"]
            y = mm(x, W if W.dtype == x.dtype else W.to(x.dtype))
            if blk.get("b") is not None:
                y = y + blk["b"].to(x.dtype)[:, None, :]
            if i == last:
                y = F.softplus(y)
            if "G" in blk or "A" in blk:
                if "G" in blk:
                    g = mm(x, blk["G"].to(x.dtype))
                else:
                    g = mm(mm(x, blk["A"].to(x.dtype)), blk["B"].to(x.dtype))
                if blk.get("c") is not None:
                    g = g + blk["c"].to(x.dtype)[:, None, :]
                y = y * self._torch.sigmoid(g)
            x = y
        return x[None] if mm is self._torch.bmm else x

    def _step_torch(self, q, k, v, key_mask):
        torch = self._torch
        B, H, m, e = self.batch, self.num_heads, self.feature_dim, self.value_dim
        Sz = self._Sz
        cdt = Sz.dtype
        if q.dtype != cdt:
            q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
        if self._blocks is not None or getattr(self.phi, "form", None) == "elu":
            f = self._phi_torch(torch.stack((q, k), dim=2))
            fq, fk = f[:, :, 0, :], f[:, :, 1, :]
        else:
            fq, fk = _features(self.phi, q, k, xp=self.xp)
        recording = torch.is_grad_enabled() and (
            Sz.requires_grad or q.requires_grad or k.requires_grad or v.requires_grad
            or any(p.requires_grad for p in self._params))
        if key_mask is not None:
            keep = key_mask[:, None, None]
            fk = torch.where(keep, fk, 0.0)
            v = torch.where(keep, v, 0.0)
        fk = fk.reshape(B * H, m, 1)
        fq = fq.reshape(B * H, 1, m)
        if recording or Sz.requires_grad:
            # out of place, so autograd sees every step (and no saved tensor is overwritten)
            ones = torch.ones((B * H, 1, 1), dtype=cdt, device=Sz.device)
            if key_mask is not None:
                ones = torch.where(keep.reshape(B, 1, 1).expand(B, H, 1).reshape(B * H, 1, 1), ones, 0.0)
            vaug = torch.cat((v.reshape(B * H, 1, e), ones), dim=-1)
            Sz = self._Sz = torch.baddbmm(Sz, fk, vaug)
            r = torch.bmm(fq, Sz)
            num, den = r[..., :e], r[..., e:]
            ok = den != 0
            out = torch.where(ok, num / torch.where(ok, den + self.eps, 1.0), 0.0)
        else:
            vb = self._vbuf
            vb[:, :, :e].copy_(v.reshape(B * H, 1, e))
            if key_mask is not None:  # a padded token adds nothing to z either
                vb[:, :, e:].copy_(keep.reshape(B, 1, 1).expand(B, H, 1).reshape(B * H, 1, 1))
                self._vbuf_masked = True
            elif self._vbuf_masked:
                vb[:, :, e:].fill_(1.0)
                self._vbuf_masked = False
            Sz.baddbmm_(fk, vb)
            r = torch.bmm(fq, Sz)
            num, den = r[..., :e], r[..., e:]
            if self._plain_divide:
                out = num / den.add_(self.eps)
            else:
                out = torch.where(den != 0, num / (den + self.eps), 0.0)
        out = out.reshape(B, H, e)
        return out if out.dtype == self.dtype else out.to(self.dtype)
