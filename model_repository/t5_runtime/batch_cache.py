"""The KV cache of every row decoded together, kept in torch tensors on the model's device.

Rows of many requests share one decoder call per step even when they started at different steps:
their self-attention pasts are left-padded to one length and `decoder_attention_mask` marks the real
positions (T5's relative position bias depends only on key - query, which left padding keeps: the
build checks it). Their encoder outputs are right-padded to one length, as a padded batch is.

Inputs that stay the same from step to step (cross K/V, encoder mask, placeholders) are passed as
the same objects, so a BLS caller sends them without copying them again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.nn import functional

from . import spec

# Runs a model: named input tensors and the names of the outputs wanted -> those outputs.
ModelCall = Callable[[dict[str, torch.Tensor], Sequence[str]], dict[str, torch.Tensor]]
_CACHED_STEP_OUTPUTS = (spec.LOGITS, spec.NEW_SELF_KV)  # the cross K/V are already here


def _pad_axis(tensor: torch.Tensor, axis: int, before: int, after: int) -> torch.Tensor:
    """Zero-pad `tensor` along `axis`."""
    if before == after == 0:
        return tensor
    widths = [0, 0] * (tensor.dim() - 1 - axis) + [before, after]
    return functional.pad(tensor, widths)


class _PingPong:
    """Two flat buffers handed out in turn, each reused for a tensor of any shape that fits.

    The self K/V are rewritten into a new tensor every step (one position longer), reading the previous
    one, and both self and cross K/V whenever rows join or leave; a fresh allocation of that size costs page
    faults worth ~2x the copy itself. The tensor handed out last time stays valid until the call after next,
    by which time the cache has replaced it.
    """

    def __init__(self) -> None:
        self._flat: list[torch.Tensor | None] = [None, None]
        self._turn = 0

    def empty(self, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        size = math.prod(shape)
        flat = self._flat[self._turn]
        if flat is None or flat.numel() < size or flat.dtype != like.dtype or flat.device != like.device:
            flat = like.new_empty(size + size // 2)  # room for the steps to come
            self._flat[self._turn] = flat
        self._turn ^= 1
        return flat[:size].view(shape)


def _is_identity(index: torch.Tensor, rows: int) -> bool:
    return index.shape[0] == rows and bool((index == torch.arange(rows, device=index.device)).all())


def _rows_together(buffers: _PingPong, blocks: Sequence[tuple[torch.Tensor, int]], length: int) -> torch.Tensor:
    """The rows of `blocks` one block after another in a reused buffer, `length` positions long: each
    block's positions start at its offset and the rest is zeros (masked out, but 0 x NaN is NaN)."""
    first = blocks[0][0]
    shape = list(first.shape)
    shape[spec.KV_ROW_AXIS] = sum(block.shape[spec.KV_ROW_AXIS] for block, _ in blocks)
    shape[spec.KV_SEQ_AXIS] = length
    out = buffers.empty(shape, first)
    row = 0
    for block, offset in blocks:
        target = out.narrow(spec.KV_ROW_AXIS, row, block.shape[spec.KV_ROW_AXIS])
        size = block.shape[spec.KV_SEQ_AXIS]
        target.narrow(spec.KV_SEQ_AXIS, 0, offset).zero_()
        target.narrow(spec.KV_SEQ_AXIS, offset, size).copy_(block)
        target.narrow(spec.KV_SEQ_AXIS, offset + size, length - offset - size).zero_()
        row += block.shape[spec.KV_ROW_AXIS]
    return out


def _first_used(mask: torch.Tensor) -> int:
    """The first position (column of `mask`) some row uses."""
    return int(mask.any(dim=0).to(torch.int8).argmax())


def _end_used(mask: torch.Tensor) -> int:
    """One past the last position some row uses."""
    used = mask.any(dim=0)
    return used.shape[0] - int(used.flip(0).to(torch.int8).argmax())


class BatchCache:
    def __init__(self, call_decoder: ModelCall, dims: spec.ModelDims, device: torch.device | str = "cpu"):
        self._call = call_decoder
        self._dims = dims
        self._device = torch.device(device)
        self._use_cache = torch.tensor([True], device=self._device)
        self._no_cache = torch.tensor([False], device=self._device)
        self._no_states: torch.Tensor | None = None
        self.self_kv: torch.Tensor | None = None  # [layers, 2, rows, heads, past, d_kv], left-padded
        self.self_mask: torch.Tensor | None = None  # int64 [rows, past]
        self.cross_kv: torch.Tensor | None = None  # [layers, 2, rows, heads, src, d_kv], right-padded
        self.cross_mask: torch.Tensor | None = None  # int64 [rows, src]
        self._cross_views: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._new_kv: torch.Tensor | None = None  # K/V of the last step's new position, not yet appended
        # Rows join and leave and the self K/V grow every step: each rewrite goes into a reused buffer.
        self._self_buffers = _PingPong()
        self._cross_buffers = _PingPong()

    @property
    def rows(self) -> int:
        return 0 if self.self_kv is None else self.self_kv.shape[spec.KV_ROW_AXIS]

    def first_step(
        self, tokens: torch.Tensor, encoder_states: torch.Tensor, encoder_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The first step of new rows (not in the cache): logits, their self K/V and their cross K/V."""
        rows = tokens.shape[0]
        no_kv = encoder_states.new_empty(self._dims.kv_shape(rows, 0))
        return self._call(
            {
                spec.USE_CACHE_BRANCH: self._no_cache,
                spec.DECODER_INPUT_IDS: tokens.to(torch.int64).view(rows, 1),
                spec.ENCODER_HIDDEN_STATES: encoder_states,
                spec.DECODER_ENCODER_MASK: encoder_mask.to(torch.int64),
                **spec.layer_kv_feeds(spec.PAST_SELF_KV, no_kv),
                **spec.layer_kv_feeds(spec.CROSS_KV, no_kv),
                spec.DECODER_SELF_MASK: torch.ones((rows, 1), dtype=torch.int64, device=tokens.device),
            },
            spec.DECODER_OUTPUTS,
        )

    def add(self, self_kv: torch.Tensor, cross_kv: torch.Tensor, cross_mask: torch.Tensor) -> None:
        """Append rows below the rows already here: after their first step (self K/V of length 1), or
        joining with no past yet (length 0), when their first token comes from the next `step`."""
        rows, length = self_kv.shape[spec.KV_ROW_AXIS], self_kv.shape[spec.KV_SEQ_AXIS]
        new_mask = torch.ones((rows, length), dtype=torch.int64, device=self_kv.device)
        cross_mask = cross_mask.to(torch.int64)
        if self.self_kv is None:
            self.self_kv, self.self_mask, self.cross_kv, self.cross_mask = self_kv, new_mask, cross_kv, cross_mask
            return
        self._append_new()
        past = self.self_kv.shape[spec.KV_SEQ_AXIS]
        # New rows are left-padded to the past (their positions last), encoder outputs right-padded.
        self.self_kv = _rows_together(self._self_buffers, [(self.self_kv, 0), (self_kv, past - length)], past)
        self.self_mask = torch.cat([self.self_mask, _pad_axis(new_mask, 1, past - length, 0)], 0)
        old_src, new_src = self.cross_mask.shape[1], cross_mask.shape[1]
        src = max(old_src, new_src)
        self.cross_kv = _rows_together(self._cross_buffers, [(self.cross_kv, 0), (cross_kv, 0)], src)
        self.cross_mask = torch.cat(
            [_pad_axis(self.cross_mask, 1, 0, src - old_src), _pad_axis(cross_mask, 1, 0, src - new_src)], 0
        )

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One cached step of every row: tokens int64 [rows] -> logits [rows, vocab]."""
        self._append_new()
        rows = tokens.shape[0]
        if self._no_states is None or self._no_states.shape[0] != rows:
            self._no_states = self.cross_kv.new_empty((rows, 0, self._dims.d_model))
        mask = torch.cat([self.self_mask, self.self_mask.new_ones((rows, 1))], 1)
        out = self._call(
            {
                spec.USE_CACHE_BRANCH: self._use_cache,
                spec.DECODER_INPUT_IDS: tokens.to(torch.int64).view(rows, 1),
                spec.ENCODER_HIDDEN_STATES: self._no_states,
                spec.DECODER_ENCODER_MASK: self.cross_mask,
                **spec.layer_kv_feeds(spec.PAST_SELF_KV, self.self_kv),
                **self._cross_feeds(),
                spec.DECODER_SELF_MASK: mask,
            },
            _CACHED_STEP_OUTPUTS,
        )
        # Appended by the next `take` (or step), together with the beam reorder: one copy of the cache, not two.
        self._new_kv = out[spec.NEW_SELF_KV]
        self.self_mask = mask
        return out[spec.LOGITS]

    def _append_new(self, rows: torch.Tensor | None = None, start: int = 0) -> None:
        """Self K/V := (past[start:] + the last step's new position)[rows], written once into a reused
        buffer: the beam reorder, the rows that left and the positions no row uses any more go in the same
        copy as the append."""
        past, new = self.self_kv, self._new_kv
        if new is None and rows is None and start == 0:
            return
        self._new_kv = None
        length = past.shape[spec.KV_SEQ_AXIS] - start
        shape = list(past.shape)
        shape[spec.KV_SEQ_AXIS] = length + (new is not None)
        if rows is not None:
            shape[spec.KV_ROW_AXIS] = rows.shape[0]
        merged = self._self_buffers.empty(shape, past)
        parts = [(past.narrow(spec.KV_SEQ_AXIS, start, length), merged.narrow(spec.KV_SEQ_AXIS, 0, length))]
        if new is not None:
            parts.append((new, merged.narrow(spec.KV_SEQ_AXIS, length, 1)))
        for source, target in parts:
            if rows is None:
                target.copy_(source)
            else:
                torch.index_select(source, spec.KV_ROW_AXIS, rows, out=target)
        self.self_kv = merged

    def _cross_feeds(self) -> dict[str, torch.Tensor]:
        # The same view objects while the cross K/V stay the same, so a BLS caller can skip resending them.
        if self._cross_views is None or self._cross_views[0] is not self.cross_kv:
            self._cross_views = (self.cross_kv, spec.layer_kv_feeds(spec.CROSS_KV, self.cross_kv))
        return self._cross_views[1]

    def take(self, self_rows: torch.Tensor, cross_rows: torch.Tensor) -> None:
        """New row i = old row self_rows[i] for self-attention state and cross_rows[i] for the rest
        (beams of one input share cross state, so a beam reorder moves only self K/V). Positions no row
        uses any more (the longest request left) and encoder padding no row needs are dropped."""
        if self_rows.shape[0] == 0:
            self.clear()
            return
        rows = self.rows
        if _is_identity(self_rows, rows):
            self._append_new()
        else:
            mask = self.self_mask.index_select(0, self_rows)
            start = _first_used(mask)
            self._append_new(self_rows, start)
            self.self_mask = mask[:, start:]
        if not _is_identity(cross_rows, rows):
            mask = self.cross_mask.index_select(0, cross_rows)
            end = _end_used(mask)
            shape = list(self.cross_kv.shape)
            shape[spec.KV_ROW_AXIS], shape[spec.KV_SEQ_AXIS] = cross_rows.shape[0], end
            source = self.cross_kv.narrow(spec.KV_SEQ_AXIS, 0, end)
            self.cross_kv = torch.index_select(
                source, spec.KV_ROW_AXIS, cross_rows, out=self._cross_buffers.empty(shape, source)
            )
            self.cross_mask = mask[:, :end]

    def take_all(self) -> None:
        """`take` of every row where it is."""
        self._append_new()

    def clear(self) -> None:
        self.self_kv = self.self_mask = self.cross_kv = self.cross_mask = self._new_kv = None
