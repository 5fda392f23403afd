"""The scalar cost checks of a chat request, before any expensive work: max_tokens, stop strings, logit_bias
size and ranges, penalties and min_tokens. Pure: a parsed request and the limits in, the request's token budget
and logit rules out, or ApiError(400) naming the field and the limit. (Images and prompt text are checked where
they are read: cluster/chat_inputs.py.)"""

from __future__ import annotations

from cluster import openai_protocol as proto
from cluster.openai_protocol import ApiError
from cluster.serve_config import Limits
from dynllava.engine import LogitRules


def check_request(chat: proto.ChatCompletionRequest, limits: Limits, vocab_size: int) -> tuple[int, LogitRules]:
    """(max_tokens the request runs to, its LogitRules), or ApiError(400)."""
    max_tokens = chat.max_completion_tokens or chat.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        field = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{field} {max_tokens} is over this server's limit of {limits.max_tokens}", param=field)
    for i, stop in enumerate(proto.stop_list(chat)):
        if len(stop) > limits.max_stop_chars:
            raise ApiError(400, f"stop[{i}] has {len(stop)} characters, over this server's limit of "
                                f"{limits.max_stop_chars} (max_stop_chars)", param="stop")
    bias = chat.logit_bias or {}
    if len(bias) > limits.max_logit_bias:
        raise ApiError(400, f"logit_bias has {len(bias)} entries, over this server's limit of "
                            f"{limits.max_logit_bias} (max_logit_bias)", param="logit_bias")
    rules = LogitRules(chat.frequency_penalty, chat.presence_penalty,
                       tuple((int(k), float(v)) for k, v in bias.items()), chat.min_tokens)
    try:
        rules.check(vocab_size, max_tokens)
    except ValueError as e:
        raise ApiError(400, str(e), param=str(e).split(" ")[0].rstrip(":")) from None
    return max_tokens, rules
