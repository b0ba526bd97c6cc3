"""The persistent batch: what the step needs about each running sequence, kept in host
buffers with one row per batch row, written when a sequence is admitted and read by every
step with one gather per array.

A running request holds a batch row (``Request.batch_row``, from the scheduler) from the step
that admits it until it finishes or is preempted. Its row holds its sampling settings
(``SamplingArrays``), seed words and prompt length; its row of the penalty state (its penalty
slot) is its batch row too. Row ``max_num_seqs`` is the padding row: greedy, never written.
Each step's arrays are fresh copies (fancy indexing), so a row rewritten while a step is in
flight never changes that step's inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from jaxllm.buckets import BucketPolicy
from jaxllm.engine.pages import PageRow
from jaxllm.engine.step import StepInputs
from jaxllm.kv_cache import NULL_PAGE
from jaxllm.layout import SeqPiece, build_step
from jaxllm.multimodal.feeder import PieceImages, step_features
from jaxllm.penalties import PenaltyRows, no_rows
from jaxllm.sampling import GREEDY, SamplingArrays, SamplingParams, seed_words


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    """One sequence slot of a step: its piece and what the step does with it."""

    piece: SeqPiece
    batch_row: int
    step: int  # the index of the token it picks (its output tokens before this one)
    penalized: bool  # records into and reads its penalty slot (its batch row)
    num_prompt: int  # positions from here on are output tokens (for the penalty state)
    from_last: int = -1  # the last step's slot whose pick is this piece's last token
    targets: Sequence[int] = ()  # per row, the prompt token after it to score (-1: none)
    num_drafts: int = 0  # the piece's last tokens that are drafts to verify
    images: PieceImages | None = None  # the image features its rows take


class InputBatch:
    """Host buffers of ``num_rows`` batch rows (plus the padding row) for a step of
    ``policy``'s shapes."""

    def __init__(self, policy: BucketPolicy, group_chunk: Sequence[int | None],
                 mask_words: int, num_speculative: int = 0, feature_words: int = 0):
        self.policy, self.group_chunk, self.mask_words = policy, group_chunk, mask_words
        self.feature_words = feature_words  # of an image feature row (0: no images)
        self.num_speculative = num_speculative  # the most drafts a piece may end in
        self.num_rows = policy.max_num_seqs
        self.pad_row = self.num_rows
        self.sampling = SamplingArrays.from_params([GREEDY] * (self.num_rows + 1))
        self.seeds = np.zeros((self.num_rows + 1, 2), np.uint32)
        # [G, rows + 1, W]: each running sequence's block-table rows, kept by its PageRows.
        self.tables = np.full((len(group_chunk), self.num_rows + 1, policy.pages_per_seq),
                              NULL_PAGE, np.int32)

    def write(self, row: int, sampling: SamplingParams, stop_ids: Sequence[int],
              pages: Sequence[PageRow] = ()) -> None:
        """Fills batch row ``row`` for a sequence admitted there (``sampling.seed``
        resolved); its block-table ``pages`` (one ``PageRow`` per layer group) keep their
        rows of the table from now on."""
        if not 0 <= row < self.num_rows:
            raise ValueError(f"batch row {row} is outside [0, {self.num_rows})")
        one = SamplingArrays.from_params([sampling], [stop_ids])
        for buffer, value in zip(self.sampling, one, strict=True):
            buffer[row] = value[0]
        self.seeds[row] = seed_words([sampling.seed])[0]
        for group, page_row in enumerate(pages):
            page_row.bind(self.tables[group, row])

    def inputs(self, plans: Sequence[SlotPlan],
               token_masks: Mapping[int, np.ndarray] | None = None, *,
               bound: bool = False) -> StepInputs:
        """The step's ``StepInputs`` for ``plans`` (one per sequence slot, in step order),
        padded to its buckets and range-checked (``build_step``); ``token_masks`` maps a slot
        to its allowed tokens (``[mask_words]`` int32 bits; structured outputs). ``bound``:
        every piece's pages are its batch row's rows of the block table (``write``), so the
        step's tables are gathered from it in one copy."""
        policy = self.policy
        pieces = [p.piece for p in plans]
        num_rows = policy.token_bucket(sum(len(p.tokens) for p in pieces))
        slots = policy.batch_bucket(len(plans))
        rows = np.full(slots, self.pad_row, np.int64)
        rows[: len(plans)] = [p.batch_row for p in plans]
        tables = self.tables[:, rows] if bound else None
        batch = build_step(pieces, policy.cache, width=policy.pages_per_seq,
                           num_rows=num_rows, num_slots=slots, group_chunk=self.group_chunk,
                           tables=tables)
        steps = np.zeros(slots, np.int32)
        steps[: len(plans)] = [p.step for p in plans]
        from_last = np.full(num_rows, -1, np.int32)
        targets = np.full(num_rows, -1, np.int32)
        starts = batch.meta.query_start_loc
        for s, p in enumerate(plans):
            end = starts[s + 1]
            if p.from_last >= 0:
                from_last[end - 1] = p.from_last
            if p.targets:
                targets[starts[s]:end] = p.targets
        penalty = penalty_rows(plans, starts, num_rows, slots, self.num_rows)
        mask = np.full((slots, self.mask_words), -1, np.int32)
        for index, words in (token_masks or {}).items():
            mask[index] = words
        sampling = SamplingArrays(*(buffer[rows] for buffer in self.sampling))
        drafts, num_drafts, verify_rows = self._drafts(plans, batch.logits_rows)
        image_rows, image_features = step_features([p.images for p in plans], starts,
                                                   num_rows, self.feature_words)
        return StepInputs(batch.tokens, from_last, batch.meta, batch.logits_rows, sampling,
                          self.seeds[rows], steps, penalty, mask, targets, drafts,
                          num_drafts, verify_rows, image_rows, image_features)

    def _drafts(self, plans: Sequence[SlotPlan], last_rows: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``StepInputs.draft_tokens``, ``num_drafts`` and ``verify_rows`` of a step whose
        pieces end at flat rows ``last_rows``: a piece ending in d drafts scores its last
        d + 1 rows."""
        k, slots = self.num_speculative, len(last_rows)
        counts = np.zeros(slots, np.int32)
        counts[: len(plans)] = [p.num_drafts for p in plans]
        if np.any(counts > k) or np.any(counts < 0):
            raise ValueError(f"drafts per piece {counts.tolist()} must be in [0, {k}]")
        for s, plan in enumerate(plans):
            if plan.num_drafts >= len(plan.piece.tokens):
                raise ValueError(f"sequence {s}: {plan.num_drafts} drafts in a piece of "
                                 f"{len(plan.piece.tokens)} tokens (its last token is none)")
        j = np.arange(k + 1)[None]
        verify_rows = (last_rows[:, None] - counts[:, None] + np.minimum(j, counts[:, None]))
        drafts = np.full((slots, k), -1, np.int32)
        for s, plan in enumerate(plans):
            if plan.num_drafts:
                drafts[s, : plan.num_drafts] = plan.piece.tokens[-plan.num_drafts:]
        return drafts, counts, verify_rows.astype(np.int32)


def penalty_rows(plans: Sequence[SlotPlan], starts: np.ndarray, num_rows: int, slots: int,
                 num_penalty_slots: int) -> PenaltyRows:
    """Which penalty slots a step records into and reads (``jaxllm.penalties``): a penalized
    slot's is its batch row (checked in ``[0, num_penalty_slots)``), a piece from position 0
    (its first, or a recompute after a preemption) resets it first; rows from the prompt
    length on are output tokens. ``starts`` are the step's ``query_start_loc``."""
    rows = no_rows(num_rows, slots)
    for s, plan in enumerate(plans):
        if not plan.penalized:
            continue
        if not 0 <= plan.batch_row < num_penalty_slots:
            raise ValueError(f"sequence {s}: penalty slot {plan.batch_row} is outside "
                             f"[0, {num_penalty_slots})")
        first, end, start = starts[s], starts[s + 1], plan.piece.num_cached
        rows.seq_slot[s] = plan.batch_row
        rows.seq_reset[s] = start == 0
        rows.row_slot[first:end] = plan.batch_row
        rows.row_output[first:end] = np.arange(start, start + end - first) >= plan.num_prompt
    return rows


def plans_for(pieces: Sequence[SeqPiece], rows: Sequence[int]) -> list[SlotPlan]:
    """Plans of pieces that pick their first token from their batch row's settings, without
    penalties (warm-up and tests)."""
    return [SlotPlan(piece, row, 0, False, 0) for piece, row in zip(pieces, rows, strict=True)]


def inputs_for(batch: InputBatch, pieces: Sequence[SeqPiece],
               sampling: Sequence[SamplingParams], *, steps: Sequence[int] | None = None,
               targets: Sequence[Sequence[int]] | None = None) -> StepInputs:
    """A step of ``pieces``, batch rows 0.. written from ``sampling`` (seeds resolved), each
    picking token ``steps[i]`` (default 0) and scoring ``targets[i]`` (per row): one step
    outside the engine, for tests and benchmarks."""
    for row, params in enumerate(sampling):
        batch.write(row, params, ())
    plans = [SlotPlan(piece, row, 0 if steps is None else steps[row], False, 0,
                      targets=() if targets is None else targets[row])
             for row, piece in enumerate(pieces)]
    return batch.inputs(plans)
