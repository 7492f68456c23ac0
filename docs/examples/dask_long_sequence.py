"""
One attention call over two million tokens on a Dask cluster
============================================================

Not run at docs build time (it takes a minute or more): run it yourself with
``python docs/examples/dask_long_sequence.py [--tokens 2000000] [--workers 4] [--memory 2GiB]``.

The queries, keys and values are generated lazily, block by block, so the whole input
(3 x N x H x d float32: 12 GiB at N = 2M, H = 8, d = 64) never exists in one place: each worker
holds a few blocks at a time, under a per-worker memory limit smaller than the input. kernelattn's
Dask path computes per-block states, combines them with a blockwise prefix (causal) or a tree
reduction (non-causal), and attends block by block; the task graph grows linearly with the
number of blocks. The script prints the time, the peak memory of each worker, and checks the last
block against a NumPy computation that continues from the state of everything before it.
"""

import argparse
import resource
import time

import dask.array as da
import numpy as np
from dask.distributed import Client, LocalCluster

import kernelattn as ka


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--block", type=int, default=65_536, help="tokens per block")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--memory", default="2GiB", help="memory limit per worker")
    p.add_argument("--kernel", default="glu")
    p.add_argument("--noncausal", action="store_true")
    args = p.parse_args()

    N, H, d, blk = args.tokens, args.heads, args.head_dim, args.block
    total_gib = 3 * N * H * d * 4 / 2**30
    print(f"N={N:,} tokens, H={H}, d={d}, float32: input {total_gib:.1f} GiB in blocks of {blk:,} tokens; "
          f"{args.workers} workers with {args.memory} each")

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, memory_limit=args.memory,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        rng = da.random.default_rng(0)
        shape, chunks = (1, H, N, d), (1, H, blk, d)
        q, k, v = (rng.standard_normal(shape, chunks=chunks, dtype=np.float32) * 0.5 for _ in range(3))
        phi = ka.feature_map(args.kernel, num_heads=H, head_dim=d, seed=0, like=q)
        causal = not args.noncausal

        out, state = ka.linear_attention(q, k, v, feature_map=phi, causal=causal, return_state=True)
        print(f"graph: {len(out.__dask_graph__()):,} tasks for {len(out.chunks[2])} blocks")

        t0 = time.perf_counter()
        # reduce on the workers: the output (4 GiB at 2M tokens) is never gathered
        rms, tail, S, z = client.compute([da.sqrt((out.astype(np.float64) ** 2).mean()),
                                          out[:, :, -256:, :], state.S, state.z], sync=True)
        elapsed = time.perf_counter() - t0
        peaks = client.run(peak_rss_mib)
        print(f"time: {elapsed:.1f} s ({N / elapsed:,.0f} tokens/s), output RMS {rms:.4f}")
        for addr, mib in sorted(peaks.items()):
            print(f"  worker {addr}: peak memory {mib:,.0f} MiB")

        # check: the last 256 tokens, recomputed in NumPy from the state of all tokens before them
        if causal:
            _, before = ka.linear_attention(q[:, :, :-256], k[:, :, :-256], v[:, :, :-256], feature_map=phi,
                                            causal=True, return_state=True)
            S0, z0 = client.compute([before.S, before.z], sync=True)
            q_t, k_t, v_t = client.compute([q[:, :, -256:], k[:, :, -256:], v[:, :, -256:]], sync=True)
            phi_np = phi.to(xp=np)
            again = ka.linear_attention(q_t, k_t, v_t, feature_map=phi_np, causal=True,
                                        initial_state=ka.LinearAttentionState(S0, z0))
            print(f"last 256 tokens vs NumPy continuing from the prefix state: max |diff| = "
                  f"{np.abs(again - tail).max():.2e}")


if __name__ == "__main__":
    main()
