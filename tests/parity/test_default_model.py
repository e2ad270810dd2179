"""The bundled default model (SmolLM2-135M-Instruct, GGUF) through the offline API, against transformers."""
from __future__ import annotations

import pytest
import torch

from kiln import LLM, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(None, dtype="float32", block_size=16, num_gpu_blocks=256)


def test_chat_answers_paris(llm):
    out = llm.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_greedy_matches_transformers_loading_the_gguf(llm, transformers_gguf_model):
    hf = transformers_gguf_model
    prompts = [llm.tokenizer.apply_chat_template(QUESTION),
               llm.tokenizer.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}]),
               llm.tokenizer.encode("The three primary colors are")]
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            g = hf.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
        assert o.token_ids == g[0, len(p):].tolist()


def test_stop_strings_cut_the_text(llm):
    full = llm.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0))[0].text
    assert "Paris" in full
    cut = llm.chat(QUESTION, SamplingParams(max_tokens=24, temperature=0, stop=["Paris"]))[0]
    assert cut.text == full[:full.index("Paris")]
    assert cut.finish_reason == "stop" and cut.stop_reason == "Paris"


def test_streaming_callback_sees_the_whole_text(llm):
    pieces = []
    out = llm.generate(["Once upon a time", "Hello"], SamplingParams(max_tokens=16, temperature=0),
                       on_text=lambda i, d: pieces.append((i, d)))
    assert "".join(d for i, d in pieces if i == 0) == out[0].text
    assert "".join(d for i, d in pieces if i == 1) == out[1].text


def test_prompt_logprobs_match_transformers_and_rank_the_answer(llm, transformers_gguf_model):
    """Scoring text (lm-evaluation-harness's loglikelihood): the model's logprob of each prompt token."""
    def score(text: str) -> tuple[list[int], list]:
        ids = llm.tokenizer.encode(text)
        out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
        return ids, out.prompt_logprobs
    ids, lps = score("The capital of France is Paris")
    assert len(lps) == len(ids) and lps[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(transformers_gguf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for pos in range(1, len(ids)):
        chosen, top = lps[pos]
        assert chosen == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=2e-3)
        assert [t for t, _ in top] == ref[pos - 1].topk(2).indices.tolist()
    _, wrong = score("The capital of France is London")
    assert lps[-1][0] > wrong[-1][0] + 1  # the model knows which continuation is right
