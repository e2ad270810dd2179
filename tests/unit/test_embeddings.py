"""Embedding requests (SamplingParams.embed, OpenAI's /v1/embeddings): the prompt's last position's final hidden
state, L2-normalized, equal to transformers' on the same weights, whatever the step: beside generation, chunked,
from the prefix cache, a one-token prompt, under tensor parallelism, with a LoRA adapter."""
from __future__ import annotations

import pytest
import torch

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import SamplingParams
from kiln.errors import ErrorKind
from tests.helpers.tiny_models import write_tiny_model

EMBED = SamplingParams(max_tokens=1, embed=True)
PROMPTS = [list(range(5, 45)), [7], list(range(100, 133)), list(range(5, 45)) + [9, 9]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def reference(model_dir, prompts) -> list[torch.Tensor]:
    import transformers as tf
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.nn.functional.normalize(model.model(torch.tensor([p])).last_hidden_state[0, -1], dim=-1)
                for p in prompts]


def make_core(model_dir, **kw) -> EngineCore:
    cfg = dict(model=str(model_dir), dtype="float32", block_size=16, num_gpu_blocks=64, max_num_seqs=8,
               async_scheduling=False) | kw
    return EngineCore(EngineConfig(**cfg))


def run(core, work):
    for rid, p, sp in work:
        err = core.add_request(rid, p, sp)
        assert err is None, err.error
    got = {}
    while core.has_unfinished():
        for o in core.step():
            assert o.error is None, o.error
            got.setdefault(o.request_id, []).append(o)
    return got


@pytest.mark.parametrize("kw", [dict(), dict(max_num_batched_tokens=8), dict(async_scheduling=True),
                                dict(enable_prefix_caching=False)])
def test_embeddings_equal_transformers_beside_generation(model_dir, kw):
    ref = reference(model_dir, PROMPTS)
    core = make_core(model_dir, **kw)
    work = [(f"e{i}", p, EMBED) for i, p in enumerate(PROMPTS)]
    work.insert(1, ("g", list(range(200, 230)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    got = run(core, work)
    for i, r in enumerate(ref):
        (out,) = got[f"e{i}"]  # one output: the end, with the vector and no token
        assert out.finished and out.finish_reason == "stop" and out.new_token_ids == []
        vec = torch.tensor(out.embedding)
        assert vec.shape == r.shape and torch.allclose(vec, r, atol=1e-4) and abs(vec.norm() - 1) < 1e-5
    assert sum(len(o.new_token_ids) for o in got["g"]) == 6
    assert core.kv.num_free_blocks == core.kv.num_blocks or core.cfg.enable_prefix_caching
    if core.cfg.enable_prefix_caching:  # again, now from the cache: the first prompt's two full blocks
        hits = core.kv.num_cached_hits
        (out,) = run(core, [("again", PROMPTS[3], EMBED)])["again"]
        assert core.kv.num_cached_hits - hits == 32 and torch.allclose(torch.tensor(out.embedding), ref[3], atol=1e-4)


def test_embedding_requests_are_checked(model_dir):
    core = make_core(model_dir)
    for bad in (dict(prompt_logprobs=1), dict(structured=("json_object", ""))):
        err = core.add_request("x", [1, 2], SamplingParams(max_tokens=1, embed=True, **bad))
        assert err is not None and err.error_type is ErrorKind.INVALID and "embedding request" in err.error
    with pytest.raises(ValueError, match="embed must be a bool"):
        SamplingParams(embed="yes")


def test_two_ranks_embed_as_one(model_dir):
    ref = reference(model_dir, PROMPTS[:3])
    core = make_core(model_dir, tensor_parallel_size=2, device="cpu", max_num_batched_tokens=16)
    try:
        got = run(core, [(f"e{i}", p, EMBED) for i, p in enumerate(PROMPTS[:3])])
    finally:
        core.close()
    for i, r in enumerate(ref):
        assert torch.allclose(torch.tensor(got[f"e{i}"][0].embedding), r, atol=1e-4)


def test_llm_embed(tmp_path, default_model_dir):
    from kiln import LLM
    d = write_tiny_model("llama", tmp_path / "with-tokenizer", tokenizer_dir=default_model_dir)
    llm = LLM(str(d), dtype="float32", num_gpu_blocks=32, block_size=16)
    got = llm.embed(["The capital of France is Paris.", PROMPTS[2]])
    ids = llm.tokenizer.encode("The capital of France is Paris.")
    for vec, r in zip(got, reference(d, [ids, PROMPTS[2]])):
        assert torch.allclose(torch.tensor(vec), r, atol=1e-4)
