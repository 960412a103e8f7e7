"""The pool of recurrent-state slots of hybrid models (Mamba2 / Gated DeltaNet layers): one slot per
running request, holding every state layer's conv window and recurrent matrix at that index.

Invariant: every slot is either free (in `free_slots`, once) or held by exactly one request (in
`req_to_slot`); never both, never neither. Pure Python: no torch.
"""

from __future__ import annotations


class StatePool:
    """Hands out fixed-size state slots to requests and takes them back."""

    def __init__(self, num_slots: int) -> None:
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_state_slots={num_slots!r} is invalid: expected an int >= 1")
        self.num_slots = num_slots
        # Popped from the end: the lowest slot ids are handed out first.
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.req_to_slot: dict[str, int] = {}

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def get_slot(self, request_id: str) -> int | None:
        return self.req_to_slot.get(request_id)

    def allocate(self, request_id: str) -> int | None:
        """A free slot for the request (None when none is left); a request holds at most one."""
        if request_id in self.req_to_slot:
            raise ValueError(f"request {request_id!r} already holds state slot")
        if not self.free_slots:
            return None
        slot = self.free_slots.pop()
        self.req_to_slot[request_id] = slot
        return slot

    def free(self, request_id: str) -> None:
        """Give the request's slot back (a request holding none is ignored)."""
        slot = self.req_to_slot.pop(request_id, None)
        if slot is not None:
            self.free_slots.append(slot)

    def check_invariants(self) -> None:
        """Assert every slot is free exactly once or held by exactly one request."""
        held = list(self.req_to_slot.values())
        assert len(set(held)) == len(held), "a state slot is held by two requests"
        assert len(set(self.free_slots)) == len(self.free_slots), "a state slot is twice free"
        assert not set(held) & set(self.free_slots), "a state slot is held and free"
        every = sorted(held + self.free_slots)
        assert every == list(range(self.num_slots)), "a state slot is lost or unknown"
