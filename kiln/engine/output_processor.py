"""One request's engine outputs -> what its caller shows: visible text deltas, the stop-string cut, the finish
reason and the logprobs of each token.

The engine returns only token ids and a finish reason; text and stop strings are the caller's side. The offline
`LLM` and every server front end (kiln/server/frontend.py) feed each `EngineOutput` of a request to its
`OutputProcessor` and get back one `TokenEvent` per token, so all of them cut, finish and detokenize alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from kiln.engine.request import EngineOutput, FinishReason, SamplingParams
from kiln.tokenizer import IncrementalDetokenizer


@dataclass
class TokenEvent:
    """New output of one request: usually one token; the last event has finished=True."""

    token_ids: list[int]
    text: str                                  # the text that became visible (may be "")
    logprobs: list | None = None               # per token: (logprob, [(token_id, logprob), ...]) or None
    finished: bool = False
    finish_reason: str | None = None           # stop | length | abort | error
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0                 # total so far
    stop_reason: str | int | None = None       # the stop string that ended it, or the engine's stop token id
    prompt_logprobs: list | None = None        # on the first event, when asked: per prompt token (the first None)
    embedding: list[float] | None = None       # an embedding request's answer, on its last (only) event


class OutputProcessor:
    """Detokenizes and stops one request.

    ``process(output)`` takes each engine output in turn and returns its events. A stop string found in the text
    finishes the request here while the engine still runs it: the event is finished but the engine output was
    not, and the caller aborts the request in the engine. Once finished, further outputs are ignored.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams, *,
                 skip_special_tokens: bool = True, include_stop_str_in_output: bool = False):
        self.num_prompt_tokens = len(prompt_token_ids)
        self._detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, skip_special_tokens=skip_special_tokens,
                                             stop=params.stop, include_stop_str_in_output=include_stop_str_in_output)
        self.token_ids: list[int] = []  # up to and including the token that completed a stop string
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None

    @property
    def text(self) -> str:
        """The visible text so far; once finished, the whole answer (cut at a stop string)."""
        return self._detok.text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def process(self, output: EngineOutput) -> list[TokenEvent]:
        """The events of one engine output: one per new token, the last finished when the request ended here
        (an end without a token gives one empty finished event). The first event carries the prompt logprobs
        that came with the output."""
        events = self._events(output)
        if output.prompt_logprobs is not None and events:
            events[0].prompt_logprobs = output.prompt_logprobs
        if output.embedding is not None and events:
            events[-1].embedding = output.embedding
        return events

    def _events(self, output: EngineOutput) -> list[TokenEvent]:
        if self.finished:
            return []
        ids = list(output.new_token_ids or [])
        events: list[TokenEvent] = []
        for i, tid in enumerate(ids):
            self.token_ids.append(tid)
            lp = output.logprobs[i] if output.logprobs and i < len(output.logprobs) else None
            if lp is not None and self.logprobs is not None:
                self.logprobs.append(lp)
            delta = self._detok.add([tid])
            if self._detok.stopped:
                self._finish(FinishReason.STOP.value, self._detok.stop_reason, None)
            elif output.finished and i == len(ids) - 1:
                delta += self._detok.flush()
                # an engine stop (EOS or a stop token id) names the token, as vLLM's stop_reason does
                self._finish(output.finish_reason, tid if output.finish_reason == FinishReason.STOP.value else None,
                             output.error)
            events.append(self._event([tid], delta, None if lp is None else [lp]))
            if self.finished:
                return events
        if output.finished:  # finished without a token (abort, error)
            tail = self._detok.flush()
            self._finish(output.finish_reason, None, output.error)
            events.append(self._event([], tail, None))
        return events

    def _finish(self, reason: str | None, stop_reason: str | int | None, error: str | None) -> None:
        self.finish_reason = reason or FinishReason.ABORT.value
        self.stop_reason = stop_reason
        self.error = error

    def _event(self, token_ids: list[int], text: str, logprobs: list | None) -> TokenEvent:
        return TokenEvent(token_ids, text, logprobs, self.finished, self.finish_reason, self.num_prompt_tokens,
                          len(self.token_ids), self.stop_reason)


__all__ = ["OutputProcessor", "TokenEvent"]
