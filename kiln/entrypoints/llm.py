"""Offline API, the shape vLLM users know:

    from kiln import LLM, SamplingParams
    llm = LLM("path/to/model", dtype="float32")
    outs = llm.generate(["Hello", [1, 2, 3]], SamplingParams(max_tokens=32))
    print(outs[0].text, outs[0].token_ids, outs[0].finish_reason)

The engine core runs in this process (no ZMQ): tokenization, detokenization and stop strings happen here,
exactly as a front end does them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.output_processor import OutputProcessor
from kiln.engine.request import SamplingParams


@dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list | None = None
    # SamplingParams.prompt_logprobs: per prompt token, None for the first, then (logprob, [(id, logprob), ...])
    prompt_logprobs: list | None = None
    embedding: list[float] | None = None  # SamplingParams.embed (LLM.embed): the prompt's vector
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", **engine_config):
        from kiln.tokenizer import Tokenizer

        cfg = EngineConfig(model=model, dtype=dtype, **engine_config)
        self.engine = EngineCore(cfg)
        self.tokenizer = Tokenizer.from_dir(self.engine.model_dir)
        self.eos_token_ids = sorted(set(self.tokenizer.eos_token_ids) | set(self.engine.eos_token_ids))
        self._ids = itertools.count()

    # -- prompts ---------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_text: Callable[[int, str], None] | None = None) -> list[CompletionOutput]:
        """Generate for every prompt in one continuous batch; outputs come back in prompt order.
        on_text(index, delta) is called as text streams (used by `kiln generate`)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        return self._run([self._prompt_ids(p) for p in prompts], params, on_text)

    def embed(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
              lora_name: str | None = None) -> list[list[float]]:
        """Each prompt's embedding: its last position's final hidden state, L2-normalized (last-token pooling, as
        Qwen3-Embedding's), in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        sp = SamplingParams(max_tokens=1, embed=True, lora_name=lora_name)
        outs = self._run([self._prompt_ids(p) for p in prompts], [sp] * len(prompts), None)
        return [o.embedding for o in outs]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             on_text: Callable[[int, str], None] | None = None, **template_kwargs) -> list[CompletionOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, **template_kwargs) for c in convs]
        sp = sampling_params or SamplingParams()
        return self._run(ids, [sp] * len(ids), on_text)

    # -- the loop ----------------------------------------------------------------------------------------
    def _run(self, prompt_ids: list[list[int]], params: list[SamplingParams],
             on_text: Callable[[int, str], None] | None) -> list[CompletionOutput]:
        results: list[CompletionOutput] = []
        index: dict[str, int] = {}
        processors: dict[str, OutputProcessor] = {}
        for i, (ids, sp) in enumerate(zip(prompt_ids, params)):
            rid = f"llm-{next(self._ids)}"
            out = CompletionOutput(rid, ids, logprobs=[] if sp.logprobs is not None else None)
            results.append(out)
            err = self.engine.add_request(rid, ids, sp, self.eos_token_ids)
            if err is not None:
                raise ValueError(f"prompt {i}: {err.error}")
            index[rid] = i
            processors[rid] = OutputProcessor(self.tokenizer, ids, sp)
        while self.engine.has_unfinished():
            for eo in self.engine.step():
                i, proc = index[eo.request_id], processors[eo.request_id]
                events = proc.process(eo)
                if not events:
                    continue
                if events[-1].finished and not eo.finished:
                    # a stop string ended it: the engine still holds the request, drop it there
                    self.engine.abort([eo.request_id])
                out = results[i]
                out.text, out.token_ids, out.logprobs = proc.text, list(proc.token_ids), proc.logprobs
                if events[0].prompt_logprobs is not None:
                    out.prompt_logprobs = events[0].prompt_logprobs
                if events[-1].embedding is not None:
                    out.embedding = events[-1].embedding
                out.finish_reason, out.stop_reason, out.error = proc.finish_reason, proc.stop_reason, proc.error
                delta = "".join(ev.text for ev in events)
                if on_text and delta:
                    on_text(i, delta)
        return results

    def get_tokenizer(self):
        return self.tokenizer

    # -- LoRA adapters ---------------------------------------------------------------------------------
    def load_lora(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter; requests then pick it by SamplingParams(lora_name=name). ValueError says
        what is wrong with it."""
        err = self.engine.update_lora(True, name, path)
        if err is not None:
            raise ValueError(err[1])

    def unload_lora(self, name: str) -> None:
        err = self.engine.update_lora(False, name)
        if err is not None:
            raise ValueError(err[1])
