"""Recurrent decoding: one token at a time with :func:`kernelattn.linear_attention_step`
and with :class:`kernelattn.LinearAttentionDecoder` (checked once, state updated in place)."""

from __future__ import annotations

import time

from .common import BACKENDS, HEAD_DIM, HEADS, XPBenchmark, inputs, safe_import

with safe_import():
    import kernelattn as ka

TOKENS = 64


class Decode(XPBenchmark):
    params = [BACKENDS, ["elu", "ffn", "glu"]]
    param_names = ["backend", "kernel"]

    def setup(self, backend, kernel):
        self.setup_backend(backend)
        q, k, v = (self.to_array(a) for a in inputs(256 + TOKENS))
        phi = ka.feature_map("elu") if kernel == "elu" else ka.feature_map(
            kernel, num_heads=HEADS, head_dim=HEAD_DIM, seed=0, like=q)
        _, self.state0 = ka.linear_attention(q[:, :, :256, :], k[:, :, :256, :], v[:, :, :256, :],
                                             feature_map=phi, causal=True, return_state=True)
        self.tokens = [(q[:, :, t, :], k[:, :, t, :], v[:, :, t, :]) for t in range(256, 256 + TOKENS)]
        self.step = self.jit(lambda q, k, v, state, phi: ka.linear_attention_step(q, k, v, feature_map=phi,
                                                                                   state=state))
        self.phi = phi
        self.decode()
        self.decoder = ka.LinearAttentionDecoder(phi, like=self.tokens[0][0], state=self.state0)
        self.time_decoder_step()

    def decode(self):
        state = self.state0
        for q, k, v in self.tokens:
            out, state = self.step(q, k, v, state, self.phi)
        return self.sync(out)

    def time_decode_64_tokens(self, *params):
        self.decode()

    def track_tokens_per_second(self, *params):
        t0 = time.perf_counter()
        self.decode()
        return TOKENS / (time.perf_counter() - t0)

    track_tokens_per_second.unit = "tokens/s"

    def time_decoder_step(self, *params):
        # one token per call; the state keeps growing, which costs the same every step
        return self.sync(self.decoder.step(*self.tokens[0]))
