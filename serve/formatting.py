"""RequestOutput -> OpenAI response pieces (choices, logprobs, usage). Pure functions."""

from __future__ import annotations

from collections.abc import Callable

from twinfer.outputs import Logprob, TokenLogprobs


def _top(entry: TokenLogprobs, n: int) -> list[tuple[int, Logprob]]:
    ranked = [(tid, lp) for tid, lp in entry.items() if lp.rank is not None]
    return sorted(ranked, key=lambda item: item[1].rank)[:n]


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprobs | None], n: int,
                        text_offset0: int, decode: Callable[[int], str]) -> dict:
    """The legacy completions ``logprobs`` object for ``token_ids`` (entries aligned with
    them; None for the first prompt token, which has no logprob and is named by ``decode``)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset0
    for tid, entry in zip(token_ids, entries):
        if entry is None:
            text = decode(tid)
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            chosen = entry[tid]
            text = chosen.decoded_token
            token_logprobs.append(chosen.logprob)
            top_logprobs.append({lp.decoded_token: lp.logprob for _, lp in _top(entry, n)})
        tokens.append(text if text is not None else "")
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_logprobs(token_ids: list[int], entries: list[TokenLogprobs], n: int) -> dict:
    """The chat ``logprobs`` object: one item per generated token with its top-n."""
    def item(text: str, logprob: float) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = []
    for tid, entry in zip(token_ids, entries):
        chosen = entry[tid]
        content.append({**item(chosen.decoded_token, chosen.logprob),
                        "top_logprobs": [item(lp.decoded_token, lp.logprob)
                                         for _, lp in _top(entry, n)]})
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
