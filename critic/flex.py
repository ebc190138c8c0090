"""Packed pairs in one `flex_attention` call per layer: the pairs' spans as a `BlockMask`.

The default packed attention (`critic.score.pair_attention`, `score.attention: sdpa_per_pair`)
runs two SDPA calls per pair per layer, which on a GPU is bound by kernel launches. Here the
whole packed row of N tokens is one call: a mask function says which key each query may see,
and `create_block_mask` turns it into 128x128 tiles so that fully masked tiles (another pair,
or a student query against its pair's teacher) are skipped, never computed.

In a row, pair k occupies [prompt | teacher | student]; a query sees key kv when both belong
to the same pair, kv is not after it in the row, and not (query in the student, key in the
teacher). That is exactly what each token sees in its own padded row, as under sdpa_per_pair.

On CUDA the kernel is `torch.compile(flex_attention)` (the fused Triton kernel; compiled on first
use, then again once when the row length first changes and the length becomes a dynamic
dimension). On CPU torch 2.13 runs flex_attention only eagerly and only forward (an unfused
reference that materialises the N x N scores; no backward): enough to check scores in tests,
not to train.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from critic.sections import SpecError

PROMPT, TEACHER, STUDENT = 0, 1, 2  # role of a token in its pair
TILE = 128  # flex_attention's default block: the unit of skipped work


def row_roles(spans: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(start, prompt, teacher, student) spans of a packed row -> (N,) pair index and (N,) role per token."""
    pair_of, role = [], []
    for k, (_, prompt, teacher, student) in enumerate(spans):
        pair_of.append(np.full(prompt + teacher + student, k, dtype=np.int32))
        role.append(np.repeat(np.array([PROMPT, TEACHER, STUDENT], dtype=np.int32), [prompt, teacher, student]))
    return np.concatenate(pair_of), np.concatenate(role)


def pair_mask_mod(pair_of: torch.Tensor, role: torch.Tensor):
    """flex_attention's mask_mod for a packed row: True where query q may attend to key kv.

    `pair_of` and `role` are (N,) tensors on the attention's device; the function only indexes
    them, so it is traced into the kernel (and evaluated by `create_block_mask` tile by tile).
    """
    def mask_mod(batch, head, q, kv):
        same_pair = pair_of[q] == pair_of[kv]
        student_sees_teacher = (role[q] == STUDENT) & (role[kv] == TEACHER)
        return same_pair & (kv <= q) & ~student_sees_teacher
    return mask_mod


def pair_block_mask(spans: list[tuple[int, int, int, int]], device: torch.device) -> BlockMask:
    """The BlockMask of a packed row (shared by every head and layer of one forward).

    The kernel may evaluate the mask past the row's end, in its last partial tile; the lookups are
    padded to whole tiles with a pair index of -1 (no real token's pair), so they stay in bounds.
    """
    pair_of, role = row_roles(spans)
    n = len(pair_of)
    tiled = -(-n // TILE) * TILE
    pair_of = np.concatenate([pair_of, np.full(tiled - n, -1, dtype=np.int32)])
    role = np.concatenate([role, np.full(tiled - n, PROMPT, dtype=np.int32)])
    mask_mod = pair_mask_mod(torch.from_numpy(pair_of).to(device), torch.from_numpy(role).to(device))
    return create_block_mask(mask_mod, None, None, n, n, device=device, BLOCK_SIZE=TILE)


_COMPILED_FLEX = None


def _kernel(device: torch.device):
    """The fused, compiled kernel on CUDA; the eager reference elsewhere (forward only)."""
    global _COMPILED_FLEX
    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def flex_pair_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask,
                        scaling: float | None) -> torch.Tensor:
    """query (1, H, N, D), key/value (1, H_kv, N, D) of one packed row -> (1, N, H, D), one kernel."""
    if query.device.type != "cuda" and torch.is_grad_enabled() and query.requires_grad:
        raise SpecError("score.attention: flex trains on CUDA only (torch's flex_attention has no backward on "
                        f"{query.device.type}); set score.attention: sdpa_per_pair")
    out = _kernel(query.device)(query, key, value, block_mask=block_mask, scale=scaling,
                                enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous()
