"""A step's results on their way back: one device-to-host copy of every result tensor, then
records of the token statistics from the host arrays."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from truffula.runner.output import TokenLogprobs


def to_host_async(parts: list[torch.Tensor]) -> Callable[[], list[np.ndarray]]:
    """Issue one device-to-host copy of every result tensor; the returned function waits for
    it and splits it back into numpy arrays."""
    if not parts:
        return list
    if not parts[0].is_cuda:  # already on the host: no copy to batch
        arrays = [p.numpy() for p in parts]
        return lambda: arrays
    flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts])
    buf = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    buf.copy_(flat, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    shapes = [p.shape for p in parts]

    def wait() -> list[np.ndarray]:
        done.synchronize()
        host = buf.numpy()
        out, pos = [], 0
        for shape in shapes:
            n = int(np.prod(shape)) if len(shape) else 1
            out.append(host[pos : pos + n].reshape(shape))
            pos += n
        return out

    return wait


def records(
    ids: np.ndarray, lps: np.ndarray, ranks: np.ndarray, ents: np.ndarray, ks: list[int]
) -> list[TokenLogprobs]:
    """Rows of [chosen | top-k] ids and logprobs -> records; -inf entries (tokens a processed
    distribution filtered out) are never listed, and no -inf / NaN logprob leaves the engine."""
    chosen = np.where(lps[:, 0] > -1e30, lps[:, 0], -9999.0).tolist()
    ents = np.where(np.isnan(ents), 0.0, ents).tolist()
    rank_list = ranks.astype(np.int64).tolist()
    id_rows = ids.astype(np.int64)
    finite = np.isfinite(lps)
    full = finite[np.arange(len(ks)), ks].tolist()  # the k-th alternative is finite
    id_list, lp_list = id_rows.tolist(), lps.tolist()
    out = []
    for r, k in enumerate(ks):
        if not full[r]:  # the row ran out of tokens: keep the finite prefix
            keep = finite[r, 1 : 1 + k]
            top_ids, top_lps = (
                id_rows[r, 1 : 1 + k][keep].tolist(),
                lps[r, 1 : 1 + k][keep].tolist(),
            )
        else:
            top_ids, top_lps = id_list[r][1 : 1 + k], lp_list[r][1 : 1 + k]
        out.append(TokenLogprobs(id_list[r][0], chosen[r], rank_list[r], ents[r], top_ids, top_lps))
    return out
