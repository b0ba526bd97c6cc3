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
from jaxllm.engine.step import MASKED_DRAFTERS, StepInputs
from jaxllm.kv_cache import NULL_PAGE
from jaxllm.layout import SeqPiece, build_step, lay_out_step
from jaxllm.multimodal.feeder import PieceImages, step_features
from jaxllm.sample.penalties import PenaltyRows, no_rows
from jaxllm.sample.sampling import GREEDY, SamplingArrays, SamplingParams, seed_words


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
    next_token: int = -1  # the token after its last row, when known (a prompt chunk)


@dataclasses.dataclass(slots=True)
class StepPlan:
    """A step's sequence slots as columns, one entry per slot in step order (the engine
    fills them in one pass over the scheduled pieces; ``of`` makes one from ``SlotPlan``s).
    A slot's tokens lie back to back in ``tokens``; its block-table rows are its batch row's
    in the persistent batch (``pages is None``) or ``pages``."""

    batch_rows: list[int] = dataclasses.field(default_factory=list)
    num_cached: list[int] = dataclasses.field(default_factory=list)
    lengths: list[int] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    held: list[int] = dataclasses.field(default_factory=list)  # pages per table row (all groups)
    steps: list[int] = dataclasses.field(default_factory=list)
    penalized: list[bool] = dataclasses.field(default_factory=list)
    num_prompt: list[int] = dataclasses.field(default_factory=list)
    from_last: list[int] = dataclasses.field(default_factory=list)
    num_drafts: list[int] = dataclasses.field(default_factory=list)
    next_tokens: list[int] = dataclasses.field(default_factory=list)  # -1: the step picks it
    targets: list[int] | None = None  # per flat row, when some slot scores its prompt
    pages: list[Sequence[Sequence[int]]] | None = None  # per slot, per layer group
    images: list[PieceImages | None] | None = None  # per slot, when some slot takes images

    def __len__(self) -> int:
        return len(self.batch_rows)

    @classmethod
    def of(cls, plans: Sequence[SlotPlan], *, bound: bool = False) -> StepPlan:
        out = cls(pages=None if bound else [p.piece.pages for p in plans])
        for p in plans:
            out.batch_rows.append(p.batch_row)
            out.num_cached.append(p.piece.num_cached)
            out.lengths.append(len(p.piece.tokens))
            out.tokens += p.piece.tokens
            out.held.append(len(p.piece.pages[0]) if p.piece.pages else 0)
            out.steps.append(p.step)
            out.penalized.append(p.penalized)
            out.num_prompt.append(p.num_prompt)
            out.from_last.append(p.from_last)
            out.num_drafts.append(p.num_drafts)
            out.next_tokens.append(p.next_token)
        if any(p.targets for p in plans):
            out.targets = [t for p in plans
                           for t in (p.targets or [-1] * len(p.piece.tokens))]
        if any(p.images is not None for p in plans):
            out.images = [p.images for p in plans]
        return out


assert NULL_PAGE == 0  # a step's block tables start as zeros (``InputBatch.inputs``)


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

    def inputs(self, plan: StepPlan | Sequence[SlotPlan],
               token_masks: Mapping[int, np.ndarray] | None = None,
               draft_masks_of: Mapping[int, np.ndarray] | None = None, *,
               bound: bool = False) -> StepInputs:
        """The step's ``StepInputs`` for ``plan`` (its sequence slots in step order), padded
        to its buckets and range-checked (``lay_out_step``), with whole-step array
        operations; ``token_masks`` maps a slot to its allowed tokens (``[mask_words]`` int32
        bits; structured outputs) and ``draft_masks_of`` a drafting one to the allowed tokens
        at its positions past the first (``[drafts, mask_words]``). ``bound``: every slot's
        block-table rows are its batch row's (``write``), gathered in one copy."""
        if not isinstance(plan, StepPlan):
            plan = StepPlan.of(plan, bound=bound)
        policy, live = self.policy, len(plan)
        if live == 0:
            raise ValueError("a step needs at least one sequence")
        lengths = np.array(plan.lengths, np.int64)
        cached = np.array(plan.num_cached, np.int64)
        num_rows = policy.token_bucket(int(lengths.sum()))
        slots = policy.batch_bucket(live)
        groups = len(self.group_chunk)
        rows = np.full(slots, self.pad_row, np.int64)
        rows[:live] = plan.batch_rows
        if plan.pages is None:
            if (bad := np.flatnonzero((rows[:live] < 0) | (rows[:live] >= self.num_rows))).size:
                raise ValueError(f"sequence {bad[0]}: batch row {rows[bad[0]]} is outside "
                                 f"[0, {self.num_rows})")
            # Only the columns some row holds are copied: past its pages a row is null.
            held = np.array(plan.held, np.int64)
            used = int(held.max())
            tables = np.zeros((groups, slots, policy.pages_per_seq), np.int32)  # NULL_PAGE
            tables[:, :, :used] = self.tables[:, rows, :used]
            batch = lay_out_step(plan.tokens, lengths, cached,
                                 np.broadcast_to(held, (groups, live)), tables, policy.cache,
                                 num_rows=num_rows, group_chunk=self.group_chunk)
        else:
            batch = build_step(_pieces(plan), policy.cache, width=policy.pages_per_seq,
                               num_rows=num_rows, num_slots=slots,
                               group_chunk=self.group_chunk)
        starts = batch.meta.query_start_loc
        last_rows = starts[1: live + 1] - 1
        steps = np.zeros(slots, np.int32)
        steps[:live] = plan.steps
        from_last = np.full(num_rows, -1, np.int32)
        fed = np.array(plan.from_last, np.int64)
        from_last[last_rows[fed >= 0]] = fed[fed >= 0]
        targets = np.full(num_rows, -1, np.int32)
        if plan.targets is not None:
            targets[: len(plan.targets)] = plan.targets
        penalty = penalty_rows(plan, batch.meta.positions, starts, num_rows, slots,
                               self.num_rows)
        mask = np.full((slots, self.mask_words), -1, np.int32)
        for index, words in (token_masks or {}).items():
            mask[index] = words
        sampling = SamplingArrays(*(buffer[rows] for buffer in self.sampling))
        drafts, num_drafts, verify_rows = self._drafts(plan, batch.tokens, lengths,
                                                       batch.logits_rows)
        draft_masks, draft_mask_index = self._draft_masks(draft_masks_of or {}, slots)
        next_tokens = np.full(slots, -1, np.int32)
        next_tokens[:live] = plan.next_tokens
        image_rows, image_features = step_features(plan.images or [None] * live, starts,
                                                   num_rows, self.feature_words)
        return StepInputs(batch.tokens, from_last, batch.meta, batch.logits_rows, sampling,
                          self.seeds[rows], steps, penalty, mask, targets, drafts,
                          num_drafts, verify_rows, draft_masks, draft_mask_index, next_tokens,
                          image_rows, image_features)

    def _draft_masks(self, masks: Mapping[int, np.ndarray], slots: int
                     ) -> tuple[np.ndarray, np.ndarray]:
        """``StepInputs.draft_masks`` and ``draft_mask_index`` from each constrained drafting
        slot's masks ``[d, mask_words]`` (d its drafts)."""
        k = self.num_speculative
        out = np.full((MASKED_DRAFTERS, k, self.mask_words), -1, np.int32)
        index = np.full(slots, -1, np.int32)
        if len(masks) > MASKED_DRAFTERS:
            raise ValueError(f"{len(masks)} constrained sequences draft in one step; at most "
                             f"{MASKED_DRAFTERS} may")
        for n, (slot, words) in enumerate(masks.items()):
            if len(words) > k:
                raise ValueError(f"sequence {slot}: {len(words)} draft masks for at most {k} "
                                 "drafts")
            out[n, : len(words)] = words
            index[slot] = n
        return out, index

    def _drafts(self, plan: StepPlan, tokens: np.ndarray, lengths: np.ndarray,
                last_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``StepInputs.draft_tokens``, ``num_drafts`` and ``verify_rows`` of a step whose
        slots end at flat rows ``last_rows``: a piece ending in d drafts scores its last
        d + 1 rows."""
        k, slots, live = self.num_speculative, len(last_rows), len(plan)
        counts = np.zeros(slots, np.int32)
        counts[:live] = plan.num_drafts
        if np.any(counts > k) or np.any(counts < 0):
            raise ValueError(f"drafts per piece {counts.tolist()} must be in [0, {k}]")
        if (bad := np.flatnonzero(counts[:live] >= lengths)).size:
            s = bad[0]
            raise ValueError(f"sequence {s}: {counts[s]} drafts in a piece of {lengths[s]} "
                             "tokens (its last token is none)")
        j = np.arange(k + 1)[None]
        verify_rows = last_rows[:, None] - counts[:, None] + np.minimum(j, counts[:, None])
        # Draft j of a slot with d drafts is its row last - d + 1 + j.
        taken = j[:, :k] < counts[:, None]
        at = np.clip(last_rows[:, None] - counts[:, None] + 1 + j[:, :k], 0, len(tokens) - 1)
        drafts = np.where(taken, tokens[at], -1).astype(np.int32)
        return drafts, counts, verify_rows.astype(np.int32)


def _pieces(plan: StepPlan) -> list[SeqPiece]:
    """The slots of a plan that carries its own pages, as pieces."""
    out, at = [], 0
    for pages, cached, n in zip(plan.pages, plan.num_cached, plan.lengths, strict=True):
        out.append(SeqPiece(pages, cached, plan.tokens[at: at + n]))
        at += n
    return out


def penalty_rows(plan: StepPlan, positions: np.ndarray, starts: np.ndarray, num_rows: int,
                 slots: int, num_penalty_slots: int) -> PenaltyRows:
    """Which penalty slots a step records into and reads (``jaxllm.sample.penalties``): a penalized
    slot's is its batch row (checked in ``[0, num_penalty_slots)``), a piece from position 0
    (its first, or a recompute after a preemption) resets it first; rows from the prompt
    length on are output tokens, but a piece's drafts are not recorded (the verifying step
    counts the accepted ones). ``positions`` and ``starts`` are the step's
    ``AttentionMetadata.positions`` and ``query_start_loc``."""
    out = no_rows(num_rows, slots)
    penalized = np.flatnonzero(plan.penalized)
    if not penalized.size:
        return out
    batch_rows = np.array(plan.batch_rows, np.int64)[penalized]
    if (bad := np.flatnonzero((batch_rows < 0) | (batch_rows >= num_penalty_slots))).size:
        s = penalized[bad[0]]
        raise ValueError(f"sequence {s}: penalty slot {batch_rows[bad[0]]} is outside "
                         f"[0, {num_penalty_slots})")
    out.seq_slot[penalized] = batch_rows
    out.seq_reset[penalized] = np.array(plan.num_cached, np.int64)[penalized] == 0
    live = len(plan)
    lengths = np.diff(starts[: live + 1])
    slot_of_row = np.repeat(np.arange(live), lengths)
    row_slot = np.full(live, -1, np.int64)
    row_slot[penalized] = batch_rows
    prompt = np.array(plan.num_prompt, np.int64)
    used = int(starts[live])
    drafts = np.zeros(live, np.int64)
    drafts[: len(plan.num_drafts)] = plan.num_drafts
    drafted = np.arange(used) >= starts[1: live + 1][slot_of_row] - drafts[slot_of_row]
    out.row_slot[:used] = np.where(drafted, -1, row_slot[slot_of_row])
    out.row_output[:used] = (out.row_slot[:used] >= 0) & (
        positions[:used] >= prompt[slot_of_row])
    return out


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
