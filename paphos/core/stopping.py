"""The token-level stop rules applied after each sampled token (stop strings are the detokenizer's).

Order: EOS and stop tokens end a request only once it has `min_tokens` outputs; then the length
limits (max_tokens, max_model_len). Pure Python: no torch.
"""

from __future__ import annotations

from paphos.request import Request, RequestStatus


def check_stop(request: Request, max_model_len: int) -> RequestStatus | None:
    """The finished status the request's last output token gives it, or None to go on.

    Sets `request.stop_reason` for a stop token (its id); EOS leaves it None.
    """
    params = request.sampling_params
    token_id = request.output_token_ids[-1]
    if request.num_output_tokens >= params.min_tokens:
        if token_id == request.eos_token_id and not params.ignore_eos:
            request.stop_reason = None
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
    if length_reached(request, max_model_len):
        return RequestStatus.FINISHED_LENGTH
    return None


def length_reached(request: Request, max_model_len: int, num_pending: int = 0) -> bool:
    """Whether the request is at a length limit (max_tokens outputs or max_model_len tokens) once
    its `num_pending` tokens still in flight are counted."""
    max_tokens = request.sampling_params.max_tokens
    if max_tokens is not None and request.num_output_tokens + num_pending >= max_tokens:
        return True
    return request.num_tokens + num_pending >= max_model_len
