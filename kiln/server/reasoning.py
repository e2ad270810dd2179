"""Reasoning in a chat output (`<think> ... </think>`), apart from its answer: the OpenAI API's
`reasoning_content` beside `content`, as vLLM's and SGLang's reasoning parsers give it (KILN_REASONING_PARSER).

Two formats:
- qwen3: the model opens its reasoning itself (`<think>` as its first token; with `enable_thinking: false` the
  template writes an empty block into the prompt and the output has none): text before `<think>` and after
  `</think>` is content.
- deepseek_r1: the template opens the block in the prompt, so the output starts inside it (a `<think>` the model
  writes anyway is dropped): everything up to `</think>` is reasoning.
Output cut off before `</think>` (max_tokens) is reasoning in both, streamed or not.
"""
from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PARSERS = ("none", "qwen3", "deepseek_r1")


@dataclass
class ReasoningSplit:
    reasoning: str | None   # None: the output had no reasoning
    content: str


class ReasoningParser:
    def __init__(self, name: str):
        if name not in PARSERS[1:]:
            raise ValueError(f"unknown reasoning parser {name!r}: use one of {', '.join(PARSERS)}")
        self.starts_inside = name == "deepseek_r1"

    def split(self, text: str) -> ReasoningSplit:
        """A whole output."""
        stream = ReasoningStream(self.starts_inside)
        pieces = stream.feed(text) + stream.finish()
        reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
        return ReasoningSplit(reasoning if stream.saw_reasoning else None,
                              "".join(t for kind, t in pieces if kind == "content"))

    def stream(self) -> "ReasoningStream":
        return ReasoningStream(self.starts_inside)


class ReasoningStream:
    """One streamed output, a text delta at a time: feed(delta) -> [("reasoning" | "content", text), ...]. A
    tag split across deltas is held back until it is whole (or clearly not a tag)."""

    def __init__(self, starts_inside: bool):
        self.inside = starts_inside
        self.saw_reasoning = starts_inside
        self.closed = False     # past </think>: the rest is content
        self.held = ""

    def feed(self, delta: str) -> list[tuple[str, str]]:
        text, self.held = self.held + delta, ""
        out: list[tuple[str, str]] = []
        while text:
            if self.closed:
                out.append(("content", text))
                break
            tag = THINK_CLOSE if self.inside else THINK_OPEN
            i = text.find(tag)
            if i < 0:
                keep = _partial_tag_suffix(text, tag)
                if self.inside and not keep:  # deepseek_r1: a stray <think> the model writes is no reasoning
                    keep = _partial_tag_suffix(text, THINK_OPEN)
                body, self.held = text[:len(text) - keep], text[len(text) - keep:]
                if self.inside:
                    body = body.replace(THINK_OPEN, "")
                if body:
                    out.append(("reasoning" if self.inside else "content", body))
                break
            before = text[:i].replace(THINK_OPEN, "") if self.inside else text[:i]
            if before:
                out.append(("reasoning" if self.inside else "content", before))
            text = text[i + len(tag):]
            if self.inside:
                self.inside, self.closed = False, True
            else:
                self.inside = self.saw_reasoning = True
        return out

    def finish(self) -> list[tuple[str, str]]:
        """What was held back at the end of the output."""
        held, self.held = self.held, ""
        if not held:
            return []
        return [("reasoning" if self.inside else "content", held)]


def _partial_tag_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag` (0 if none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
