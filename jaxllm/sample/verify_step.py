"""The verifying step's sampler: every sequence slot's ``k + 1`` positions scored, adjusted
as the ordinary sampler adjusts one (``jaxllm.engine.step.pick``), and verified
(``jaxllm.sample.verify``).

Position j of slot s is the flat row ``verify_rows[s, j]``: the piece's last token's row for
j = 0, draft ``x_{j-1}``'s row after it. Its logits get logit_bias and min_tokens at token
index ``steps + j``, then the penalties: position 0's record the step's tokens (as ``pick``
does; the host leaves draft rows out), position j's count drafts ``x_0..x_{j-1}`` as generated,
and once verified the accepted drafts are recorded (``jaxllm.sample.penalties``); last the
structured-output mask: position 0's ``token_mask``, position j's the grammar's after
``x_0..x_{j-1}`` (``draft_masks``, for the constrained sequences that draft; the host cut their
drafts at the first the grammar refuses).

Glossary: S sequence slots, k drafts at most, V padded vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxllm.sample.penalties import PenaltyState, penalize, penalize_drafts, record_accepted
from jaxllm.sample.sampling import adjust_logits, apply_token_mask, seed_keys
from jaxllm.sample.verify import filtered_distribution, verify


def verify_pick(module, hidden: jax.Array, inputs, tokens: jax.Array, mesh: Mesh | None,
                penalties: PenaltyState, top: int
                ) -> tuple[tuple[jax.Array, ...], PenaltyState]:
    """``(tokens [S, k + 1], logprobs [S, k + 1], top ids, top logprobs [S, k + 1, top],
    num_accepted [S])`` and the penalty state with the step's ``tokens`` recorded; ``inputs``
    is the step's ``StepInputs``. Log-probabilities are the model's own (before any
    adjustment), as ``pick``'s; 0 past the emitted tokens."""
    s = inputs.sampling
    slots, positions = inputs.verify_rows.shape
    logits = module.logits(hidden[inputs.verify_rows.reshape(-1)])
    logits = logits.reshape(slots, positions, logits.shape[-1])
    first, penalties = penalize(
        adjust_logits(logits[:, 0], s, inputs.steps), penalties, inputs.penalty_rows, tokens,
        s.presence_penalty, s.frequency_penalty, s.repetition_penalty, mesh)
    first = apply_token_mask(first, inputs.token_mask, mesh)

    def per_position(a: jax.Array, n: int) -> jax.Array:
        return jnp.repeat(a, n, axis=0)  # slot-major: row s * n + j

    later = positions - 1
    rest = adjust_logits(
        logits[:, 1:].reshape(slots * later, -1),
        jax.tree.map(lambda a: per_position(a, later), s),
        (inputs.steps[:, None] + jnp.arange(1, positions)[None]).reshape(-1))
    rest = penalize_drafts(rest.reshape(slots, later, -1), penalties,
                           inputs.penalty_rows.seq_slot, inputs.draft_tokens, inputs.num_drafts,
                           s.presence_penalty, s.frequency_penalty, s.repetition_penalty, mesh)
    index = inputs.draft_mask_index
    words = jnp.where((index >= 0)[:, None, None],
                      inputs.draft_masks[jnp.maximum(index, 0)], -1)  # [S, k, words]
    rest = apply_token_mask(rest.reshape(slots * later, -1),
                            words.reshape(slots * later, -1), mesh).reshape(slots, later, -1)
    adjusted = jnp.concatenate([first[:, None], rest], axis=1)
    target = filtered_distribution(adjusted.reshape(slots * positions, -1),
                                   jax.tree.map(lambda a: per_position(a, positions), s))
    verified = verify(target.reshape(slots, positions, -1), inputs.draft_tokens,
                      inputs.num_drafts, ~(s.temperature > 0), seed_keys(inputs.seeds),
                      inputs.steps, mesh=mesh)
    penalties = record_accepted(penalties, inputs.penalty_rows.seq_slot, inputs.draft_tokens,
                                verified.num_accepted, mesh)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    emitted = verified.tokens >= 0
    chosen = jnp.take_along_axis(logprobs, jnp.maximum(verified.tokens, 0)[..., None],
                                 axis=-1)[..., 0]
    top_values, top_ids = jax.lax.top_k(logprobs, top)
    return (verified.tokens, jnp.where(emitted, chosen, 0.0), top_ids, top_values,
            verified.num_accepted), penalties
