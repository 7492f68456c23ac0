"""Generation end to end: decode tokens/s of a small causal LM with linear attention (a fixed-size
state per layer) and with softmax attention (a key/value cache), after a prompt of 1K, 4K, 16K tokens.

The model is :class:`kernelattn.backends.torch_lm.CausalLM` (d_model 256, 4 heads, 4 layers,
vocabulary 1024) on torch CPU in float32, batch 1; the prompt's prefill is in ``setup``, outside
the timing.
"""

from __future__ import annotations

import time

from .common import safe_import

with safe_import():
    import torch

    from kernelattn.backends.torch_lm import CausalLM

VOCAB, D_MODEL, HEADS, LAYERS = 1024, 256, 4, 4
STEPS = 32  # tokens per track_tokens_per_second call
ROOM = 8192  # softmax cache slots past the prompt, so no timed step doubles the cache


class Generate:
    params = [["linear", "softmax"], [1024, 4096, 16384]]
    param_names = ["attention", "context"]
    timeout = 600  # softmax prefill of 16K tokens is O(N²) in setup

    def setup(self, attention, context):
        try:
            CausalLM
        except NameError:
            raise NotImplementedError("torch is not installed") from None
        self.model = CausalLM(VOCAB, D_MODEL, HEADS, LAYERS, attention=attention, seed=0).eval()
        ids = torch.randint(0, VOCAB, (1, context), generator=torch.Generator().manual_seed(0))
        self.logits, self.cache = self.model.prefill(ids, max_new_tokens=ROOM)
        self.token = ids[:, -1]
        for _ in range(3):  # warm-up: first calls allocate
            self.time_decode_token()

    def time_decode_token(self, *params):
        self.model.decode(self.token, self.cache)

    def track_tokens_per_second(self, *params):
        logits = self.logits
        t0 = time.perf_counter()
        for _ in range(STEPS):  # greedy, as generate() does
            logits, _ = self.model.decode(logits.argmax(-1), self.cache)
        return STEPS / (time.perf_counter() - t0)

    track_tokens_per_second.unit = "tokens/s"
