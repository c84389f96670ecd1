"""Contrastive (InfoNCE) loss of MaskCo (docs/DESIGN.md 4.6), with its negatives picked by index.

Paper symbols: for query q_i (the masked box of image i, query view) the positive is k_i+ (the same
box in the key view, ``k[i, 0]``); the negatives are the M negative key boxes of every *other* image
in the batch, (N - 1) * M of them; MaskCo(+in) also uses image i's own M negatives. Options: the
other images' positives ``k[j, 0]`` (with M = 0 this is MoCo v2 with in-batch negatives) and a
MoCo-style queue of past keys. logits = [q.k+ | q.negatives] / t, positive at index 0, cross-entropy.

All N * N * (1 + M) dot products come from one matmul; each query's row is then gathered with a
cached index, so the hot path has no Python loop over samples and no host sync.
"""
import functools

import torch
import torch.nn.functional


def _logit_index_of(n, m, intra, other_positives, device, groups=1):
    """int64 [n, 1 + K]: for query i, the columns of the [n, n * (1 + m)] all-pairs logits it uses,
    its positive first. Key (j, b) (image j, box b; box 0 = positive) is column j * (1 + m) + b.
    With ``groups`` G, images come in G contiguous blocks of n / G (virtual GPUs) and a query's in-batch
    negatives come from its own block only.

    Static shapes, made on ``device``: a compiled step traces this (an index from a boolean mask
    would be a data-dependent shape there, and one made on the CPU a host-to-device copy)."""
    image = torch.arange(n, device=device)
    own = image[:, None, None] == image[None, :, None]  # [n, n, 1]: the key's image is the query's
    block = image // (n // groups)  # [n]: the virtual GPU of each image
    other = ~own & (block[:, None, None] == block[None, :, None])  # [n, n, 1]: another image, same GPU
    is_negative_box = torch.arange(1 + m, device=device)[None, None, :] >= 1  # [1, 1, 1 + m]
    use = other & is_negative_box  # [n, n, 1 + m]
    if intra:
        use = use | (own & is_negative_box)
    if other_positives:
        use = use | (other & ~is_negative_box)
    per_gpu = n // groups
    count = (per_gpu - 1) * m + (m if intra else 0) + (per_gpu - 1 if other_positives else 0)  # K: every row
    # the used columns of each row in order: a stable sort brings the Trues (as 0) first
    order = torch.sort((~use.reshape(n, -1)).to(torch.uint8), dim=1, stable=True).indices  # [n, n * (1 + m)]
    positives = image[:, None] * (1 + m)  # [n, 1]
    return torch.cat([positives, order[:, :count]], dim=1)  # [n, 1 + K]


_logit_index = functools.lru_cache(maxsize=64)(_logit_index_of)  # eager steps make it once per shape


def logit_index(n, m, intra, other_positives, device, groups=1):
    """:func:`_logit_index_of`, cached when eager; traced (and constant-folded) under torch.compile."""
    make = _logit_index_of if torch.compiler.is_compiling() else _logit_index
    return make(n, m, bool(intra), bool(other_positives), torch.device(device), int(groups))


def negative_index(n, m, intra=False, other_positives=False, device="cpu", groups=1):
    """int64 ``[N, K]``: for each query, the columns of ``q @ k.reshape(N * (1 + M), C).T`` that are
    its in-batch negatives (order: by image, then box). Cached per arguments."""
    return logit_index(n, m, intra, other_positives, device, groups)[:, 1:]


def _check(q, k, valid, temperature, extra_negatives, groups=1):
    if groups < 1 or q.shape[0] % groups:
        raise ValueError(f"a batch of {q.shape[0]} does not split into {groups} virtual GPUs")
    if q.dim() != 2:
        raise ValueError(f"q must be [N, C], got {tuple(q.shape)}")
    if k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[1] or k.shape[1] < 1:
        raise ValueError(f"k must be [N, 1 + M, C] matching q {tuple(q.shape)}, got {tuple(k.shape)}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != q.shape[:1]):
        raise ValueError(f"valid must be a bool [N] tensor, got {valid.dtype} {tuple(valid.shape)}")
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if extra_negatives is not None and (extra_negatives.dim() != 2 or extra_negatives.shape[1] != q.shape[1]):
        raise ValueError(f"extra_negatives must be [K, C] with C = {q.shape[1]}, got {tuple(extra_negatives.shape)}")


def contrastive_logits(q, k, valid, temperature, intra=False, other_positives=False, extra_negatives=None,
                       groups=1):
    """fp32 ``[N, 1 + K]`` logits, the positive in column 0.

    q ``[N, C]``, k ``[N, 1 + M, C]`` (both L2-normalised; ``k[:, 0]`` the positive), valid ``[N]``
    bool or None, extra_negatives ``[Q, C]`` (a queue) appended to every row. K = (n - 1) * M, + M if
    ``intra``, + n - 1 if ``other_positives``, + Q, where n = N / ``groups``: with G virtual GPUs the
    in-batch negatives of a query come from its own block of n images (the queue is shared). Rows of
    queries with ``valid`` False use a zero query,
    so whatever those queries hold (even NaN) reaches neither the logits of others nor any gradient.
    Runs in fp32 with autocast off: logits / t with t = 0.2 need more than bf16's 8 bits.
    """
    _check(q, k, valid, temperature, extra_negatives, groups)
    n, boxes, c = k.shape
    index = logit_index(n, boxes - 1, intra, other_positives, q.device, groups)  # [N, 1 + K]
    if index.shape[1] == 1 and (extra_negatives is None or extra_negatives.shape[0] == 0):
        raise ValueError(f"k gives a query no negatives (N={n}, M={boxes - 1}, intra={intra}, "
                         f"other_positives={other_positives}) and extra_negatives is empty or None")
    with torch.autocast(q.device.type, enabled=False):
        q32 = q.float()  # [N, C]
        if valid is not None:
            q32 = torch.where(valid[:, None], q32, 0.0)  # [N, C]
        every = q32 @ k.float().reshape(n * boxes, c).T  # [N, N * (1 + M)]: one matmul for all pairs
        logits = every.gather(1, index)  # [N, 1 + K]
        if extra_negatives is not None:
            queued = q32 @ extra_negatives.detach().float().T  # [N, Q]
            logits = torch.cat([logits, queued], dim=1)  # [N, 1 + K]
        return logits / temperature  # [N, 1 + K]


def group_mean(per_query, valid, groups=1):
    """Mean of ``per_query [N]`` over the valid rows of each of ``groups`` contiguous blocks, then over the
    blocks: what G GPUs each averaging their own rows, then DDP averaging the GPUs, give (G = 1: the mean
    over the valid rows). A block without a valid row counts as zero, with no host sync to find out."""
    per_query = torch.where(valid, per_query, 0.0).view(groups, -1)  # [G, N/G]
    count = valid.view(groups, -1).sum(dim=1).clamp_min(1)  # [G]
    return (per_query.sum(dim=1) / count).mean()


def info_nce(logits, valid, groups=1):
    """Mean cross-entropy of the positive (column 0) over the valid rows of ``logits [N, 1 + K]``
    (per virtual GPU, then over the ``groups``: :func:`group_mean`).

    No valid row gives a zero that still has a graph (backward works, gradients are zero), with no
    host sync to find out.
    """
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # [N]
    per_query = torch.nn.functional.cross_entropy(logits.float(), target, reduction="none")  # [N]
    return group_mean(per_query, valid, groups)


def positive_accuracy(logits, valid, groups=1):
    """Fraction of valid rows whose positive (column 0) is strictly above every negative (per virtual
    GPU, then averaged); 0-dim tensor, no sync. A tie or a NaN is a miss (argmax would call both a hit: it
    returns the first maximum and treats NaN as the largest value)."""
    positive = logits[:, 0]  # [N]
    if logits.shape[1] > 1:
        hit = positive > logits[:, 1:].amax(dim=1)  # [N]; False for NaN
    else:
        hit = torch.isfinite(positive)
    return group_mean(hit.float(), valid, groups)


def contrastive_loss(q, k, valid, temperature, intra=False, other_positives=False, extra_negatives=None):
    """Scalar InfoNCE loss of MaskCo, the convenience wrapper of the pure pair the step runs:
    ``info_nce(contrastive_logits(...), valid)`` (one GPU's batch: no virtual-GPU groups).

    q ``[N, C]``, k ``[N, 1 + M, C]``, valid ``[N]`` bool. An invalid sample's query is left out of
    the mean; its keys stay negatives for the others (they are real regions of a real image).
    To also log accuracy, call ``contrastive_logits`` / ``info_nce`` / ``positive_accuracy`` instead.
    """
    logits = contrastive_logits(q, k, valid, temperature, intra, other_positives, extra_negatives)  # [N, 1 + K]
    return info_nce(logits, valid)


class KeyQueue:
    """A MoCo-style ring buffer of past keys, used as extra negatives (off by default).

    Unlike MoCo's ``moco/builder.py`` it is not a module buffer: it lives outside DDP (never
    re-broadcast from rank 0), and its write pointer is a Python int (MoCo's ``int(queue_ptr)`` is a
    host sync every step). Under DDP every rank must enqueue the same all-gathered keys.
    """

    def __init__(self, size, dim, device="cpu", generator=None):
        if size <= 0 or dim <= 0:
            raise ValueError(f"size and dim must be > 0, got size={size}, dim={dim}")
        start = torch.randn(size, dim, generator=generator).to(device)  # [size, dim]
        self.buffer = torch.nn.functional.normalize(start, dim=1)  # [size, dim], as MoCo initialises it
        self.ptr = 0

    def negatives(self):
        """``[size, dim]``; never written in place later (``enqueue`` replaces it), so it is safe to
        use in a graph whose backward runs after the next ``enqueue``."""
        return self.buffer

    @torch.no_grad()
    def enqueue(self, keys):
        """Write ``keys [B, dim]`` at the pointer, wrapping around; B need not divide size."""
        size, dim = self.buffer.shape
        if keys.dim() != 2 or keys.shape[1] != dim:
            raise ValueError(f"keys must be [B, {dim}], got {tuple(keys.shape)}")
        if keys.shape[0] > size:  # as if written one by one: the oldest are overwritten at once
            self.ptr = (self.ptr + keys.shape[0] - size) % size
            keys = keys[-size:]  # [size, dim]
        keys = keys.detach().to(self.buffer)  # [B, dim]
        count = keys.shape[0]
        end = self.ptr + count
        if end <= size:
            parts = [self.buffer[: self.ptr], keys, self.buffer[end:]]
        else:  # wraps: the tail of keys goes to the front
            parts = [keys[size - self.ptr:], self.buffer[end - size: self.ptr], keys[: size - self.ptr]]
        self.buffer = torch.cat(parts)  # [size, dim], a new tensor, see negatives()
        self.ptr = end % size

    def state_dict(self):
        return {"buffer": self.buffer, "ptr": self.ptr}

    def load_state_dict(self, state):
        if tuple(state["buffer"].shape) != tuple(self.buffer.shape):
            raise ValueError(f"state buffer is {tuple(state['buffer'].shape)}, queue is {tuple(self.buffer.shape)}")
        self.buffer = state["buffer"].detach().to(self.buffer).clone()
        self.ptr = int(state["ptr"]) % self.buffer.shape[0]
