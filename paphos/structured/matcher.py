"""`GrammarState`: one request's xgrammar matcher in the runner. Before each sampled step it takes
the outputs it has not seen (accepted tokens: it never runs ahead of them) and fills the request's
row of the step's token bitmask. With a `reasoning_end_token_id` the constraint starts after that
token; until then the row allows everything."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from paphos.structured.compiler import import_xgrammar

logger = logging.getLogger(__name__)


class GrammarState:
    def __init__(self, compiled: Any, reasoning_end_token_id: int | None = None) -> None:
        xgr = import_xgrammar()
        self.matcher = xgr.GrammarMatcher(compiled)
        self.reasoning_end_token_id = reasoning_end_token_id
        self.started = reasoning_end_token_id is None
        self.num_seen = 0  # outputs looked at (accepted, or before the constraint started)
        self.rejected = False

    def advance(self, output_token_ids: Sequence[int]) -> None:
        """Accept the outputs not seen yet (from where the constraint starts)."""
        end = len(output_token_ids)
        while self.num_seen < end:
            token = output_token_ids[self.num_seen]
            self.num_seen += 1
            if not self.started:
                self.started = token == self.reasoning_end_token_id
                continue
            if self.matcher.is_terminated() or self.rejected:
                continue
            if not self.matcher.accept_token(token):
                # Cannot happen for tokens drawn under the mask; logged, not raised, so a stray
                # token (e.g. a resumed request's history) does not kill the step.
                logger.warning("the grammar rejected token %d; the constraint is lifted", token)
                self.rejected = True

    @property
    def constrains(self) -> bool:
        return self.started and not self.rejected and not self.matcher.is_terminated()

    def fill(self, bitmask: Any, row: int) -> None:
        """Write this request's allowed tokens into `bitmask[row]` ([rows, ceil(vocab/32)] int32,
        bit j of word i = token 32 i + j allowed)."""
        if self.constrains:
            self.matcher.fill_next_token_bitmask(bitmask, row)
        else:
            bitmask[row].fill_(-1)
