"""Tokenizer, chat template and incremental (streaming) detokenizer.

``Tokenizer`` wraps a transformers fast tokenizer loaded from a local model directory. ``IncrementalDetokenizer``
turns generated token ids into text deltas for streaming: it never emits a partial UTF-8 character, its joined
deltas equal ``Tokenizer.decode(all_output_ids)``, each step decodes only a small window of ids (prefix/read
offsets, as in vLLM / TGI), and it cuts the text at stop strings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

REPLACEMENT_CHAR = "\ufffd"
NO_CHAT_TEMPLATE = "This model does not support chat_template."
# Tools for a chat template that cannot render them (no `tools` in it): a system preamble in the Hermes / Qwen2.5
# wording, asking for the <tool_call> format that kiln/server/tool_parsers.py's hermes parser reads.
TOOL_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


def load_hf_tokenizer(model_dir: Path) -> Any:
    """The directory's transformers tokenizer, through the class its tokenizer_config.json names when transformers
    has it (its fast variant first), else AutoTokenizer. AutoTokenizer imports torch and the model's config classes
    on the way: 2-3 s in each front-end process at every start (they load beside the engine on the same cores);
    the named class alone loads in well under a second."""
    import transformers

    name = None
    try:
        name = json.loads((model_dir / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        pass
    if isinstance(name, str) and name.isidentifier():
        for candidate in ([name] if name.endswith("Fast") else [name + "Fast", name]):
            try:
                cls = getattr(transformers, candidate, None)
            except Exception:  # noqa: BLE001 - a class whose optional dependency is missing
                cls = None
            if cls is None or not hasattr(cls, "from_pretrained"):
                continue
            try:
                hf = cls.from_pretrained(str(model_dir), local_files_only=True)
            except Exception:  # noqa: BLE001 - AutoTokenizer below tries every way it knows, and names the error
                break
            if getattr(hf, "backend_tokenizer", None) is not None:
                return hf
            break  # a slow (Python) tokenizer: AutoTokenizer knows its fast counterpart
    return transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


class Tokenizer:
    """A Hugging Face fast tokenizer plus the facts about it the server needs."""

    def __init__(self, hf_tokenizer: Any, generation_config: dict | None = None):
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{type(hf_tokenizer).__name__} is not a fast tokenizer (no tokenizer.json backend)")
        self.hf = hf_tokenizer
        self._backend = backend
        self._generation_config = generation_config or {}

        bos = self.hf.bos_token_id
        self.bos_token_id: int | None = bos
        # Does plain encoding add a BOS (sentencepiece-style add_bos_token)? Checked once, used by the chat path.
        with_special = self._backend.encode("a", add_special_tokens=True).ids
        without = self._backend.encode("a", add_special_tokens=False).ids
        self._adds_bos = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]

        eos_ids: list[int] = []
        gen_eos = self._generation_config.get("eos_token_id")
        for v in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
            if v is not None and int(v) not in eos_ids:
                eos_ids.append(int(v))
        if self.hf.eos_token_id is not None and self.hf.eos_token_id not in eos_ids:
            eos_ids.append(int(self.hf.eos_token_id))
        self.eos_token_ids: list[int] = eos_ids

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> "Tokenizer":
        """Load from a local model directory (no network)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise ValueError(f"Tokenizer directory {model_dir} does not exist")
        hf = load_hf_tokenizer(model_dir)
        gen_path = model_dir / "generation_config.json"
        gen = {}
        if gen_path.is_file():
            try:
                gen = json.loads(gen_path.read_text())
            except ValueError:
                gen = {}
        return cls(hf, gen)

    # ------------------------------------------------------------------ basics

    @property
    def vocab_size(self) -> int:
        """Number of tokens the tokenizer knows (base vocabulary plus added tokens)."""
        return len(self.hf)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.hf.pad_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Decode without any clean-up of spaces (so decoding is stable under concatenation)."""
        if not isinstance(ids, list):
            ids = [int(i) for i in ids]  # tuples, numpy / torch ints
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._backend.id_to_token(int(i)) for i in ids]

    # ------------------------------------------------------------------ chat template

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def chat_template_source(self) -> str:
        """The chat template's Jinja text ("" without one; named templates joined)."""
        t = getattr(self.hf, "chat_template", None) or ""
        return "\n".join(t.values()) if isinstance(t, dict) else str(t)

    @property
    def template_supports_tools(self) -> bool:
        """Does the template render `tools` (and tool calls / tool results) itself?"""
        return "tools" in self.chat_template_source

    def _messages_with_tools(self, messages: list[dict], tools: list[dict] | None) -> tuple[list[dict], list | None]:
        """Tool definitions and tool turns in the form the template takes.

        A template with tool support gets ``tools`` as transformers passes them, and assistant ``tool_calls`` with
        ``function.arguments`` as a dict (what such templates expect; the API carries a JSON string). Without tool
        support the tools become a system preamble (TOOL_PREAMBLE, appended to a leading system message or as a
        new one), assistant tool calls become ``<tool_call>`` text and tool results a user turn wrapped in
        ``<tool_response>`` tags, as the Qwen2.5 template writes them."""
        native = self.template_supports_tools
        out = []
        for m in messages:
            m = dict(m)
            calls = m.get("tool_calls")
            if calls:
                calls = [_call_with_dict_arguments(c) for c in calls]
                if native:
                    m["tool_calls"] = calls
                else:
                    del m["tool_calls"]
                    text = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                                    "arguments": c["function"]["arguments"]},
                                                                   ensure_ascii=False) + "\n</tool_call>"
                                     for c in calls)
                    m["content"] = (m.get("content") or "") + ("\n" if m.get("content") else "") + text
            if m.get("role") == "tool" and not native:
                m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
            out.append(m)
        if not tools or native:
            return out, (tools or None)
        preamble = TOOL_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = dict(out[0], content=f"{out[0].get('content') or ''}\n\n{preamble}".lstrip())
        else:
            out.insert(0, {"role": "system", "content": preamble})
        return out, None

    def render_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                             tools: list[dict] | None = None, **kwargs) -> str:
        """The chat template's text for ``messages`` and, if given, the OpenAI ``tools`` (ValueError when there is
        no template or it fails)."""
        if not self.has_chat_template:
            raise ValueError(NO_CHAT_TEMPLATE)
        kwargs.pop("tokenize", None)
        messages, tools = self._messages_with_tools(messages, tools)
        try:
            return self.hf.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as e:  # jinja2 TemplateError / raise_exception() in the template, bad message shapes
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"Chat template error: {e}") from e

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of ``messages`` rendered by the chat template.

        The rendered text is encoded without the tokenizer's own special tokens; a BOS is prepended only when the
        tokenizer normally adds one and the template did not already write it (so there is never a double BOS).
        """
        text = self.render_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        ids = self.encode(text, add_special_tokens=False)
        if self._adds_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids


def _call_with_dict_arguments(call: dict) -> dict:
    """An OpenAI tool call whose function.arguments (a JSON string on the wire) is parsed to a dict."""
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ValueError(f"tool call arguments are not valid JSON: {args[:80]!r}") from None
    return dict(call, function=fn)


class IncrementalDetokenizer:
    """Streaming detokenizer for one request.

    ``add(ids)`` returns the newly visible text. Text that could still change is held back: a token that ends
    inside a multi-byte character (decoded as a trailing U+FFFD) waits for the rest of the character, and a tail
    that could be the start of a stop string waits until it is clearly not one. ``flush()`` releases what is held
    at the end of generation. Every step decodes only ``ids[prefix_offset:]`` -- the last emitted token(s) plus
    the new ones -- so the cost of a step does not grow with the output length.

    ``prompt_token_ids`` are kept for reference only: the output text is exactly
    ``tokenizer.decode(output_ids)`` (no prompt context), so it is the same text a non-streaming response gets.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        stop: Iterable[str] | str | None = None,
        include_stop_str_in_output: bool = False,
    ):
        self.tokenizer = tokenizer
        self.prompt_token_ids = list(prompt_token_ids or [])
        self.skip_special_tokens = skip_special_tokens
        if isinstance(stop, str):
            stop = [stop]
        self.stop: list[str] = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_hold = max((len(s) for s in self.stop), default=1) - 1

        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window
        self._read_offset = 0  # ids before this are already turned into text
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset]), cached
        self._pending = ""  # decoded text not released yet (held stop-string tail + newest delta)
        self._chunks: list[str] = []  # released text
        self.stopped = False
        self.stop_reason: str | None = None

    # ------------------------------------------------------------------ public

    @property
    def token_ids(self) -> list[int]:
        """Output token ids added so far (up to and including the one that completed a stop string)."""
        return list(self._ids)

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    @property
    def text(self) -> str:
        """The output text released so far (= the joined deltas); once stopped, the text cut at the stop string."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, new_token_ids: Iterable[int] | int) -> str:
        """Add generated ids; return the text that became visible. Ignored (returns "") once stopped."""
        if isinstance(new_token_ids, int):
            new_token_ids = [new_token_ids]
        out = []
        for tid in new_token_ids:
            if self.stopped:
                break
            self._ids.append(int(tid))
            self._pending += self._decode_step()
            out.append(self._release(final=False))
        return "".join(out)

    def flush(self) -> str:
        """End of generation: release everything still held back (incomplete characters included)."""
        if self.stopped:
            return ""
        if self._read_offset < len(self._ids):
            window = self.tokenizer.decode(self._ids[self._prefix_offset :], self.skip_special_tokens)
            if window.startswith(self._prefix_text):
                self._pending += window[len(self._prefix_text) :]
            self._prefix_offset = self._read_offset = len(self._ids)
            self._prefix_text = ""
        return self._release(final=True)

    # ------------------------------------------------------------------ internals

    def _decode_step(self) -> str:
        new_text = self.tokenizer.decode(self._ids[self._prefix_offset :], self.skip_special_tokens)
        if new_text.endswith(REPLACEMENT_CHAR) or not new_text.startswith(self._prefix_text):
            # Ends mid-character (or a tokenizer whose decoding is not prefix-stable here): wait for more ids.
            return ""
        delta = new_text[len(self._prefix_text) :]
        # The next window starts at the ids just turned into text.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self.tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset], self.skip_special_tokens
        )
        return delta

    def _release(self, final: bool) -> str:
        # Invariant: a stop string can only start inside _pending (everything released was checked to be no
        # prefix of one), so the search never looks at old text.
        pending = self._pending
        hold = 0
        if self.stop and pending:
            hit = self._find_stop(pending)
            if hit is not None:
                idx, s = hit
                cut = idx + len(s) if self.include_stop_str_in_output else idx
                self.stopped = True
                self.stop_reason = s
                self._pending = ""
                return self._emit(pending[:cut])
            if not final:
                hold = self._held_tail(pending)
        if hold:
            self._pending = pending[-hold:]
            return self._emit(pending[:-hold])
        self._pending = ""
        return self._emit(pending)

    def _emit(self, delta: str) -> str:
        if delta:
            self._chunks.append(delta)
        return delta

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for k in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0


__all__ = ["Tokenizer", "IncrementalDetokenizer", "NO_CHAT_TEMPLATE", "TOOL_PREAMBLE"]
