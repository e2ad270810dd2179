"""A step whose rows all have one query token but one of them does not sample (a prompt chunk of one token, given
when the step budget has one token left beside the decodes) through the decode CUDA-graph path: the graph computes
logits for every row, and only the sampling rows' logits may reach the sampler. On CPU the graphs are stood in for
by the eager model over all rows, which is what a replay computes."""
from __future__ import annotations

import pytest
import torch

from kiln.engine.config import EngineConfig
from kiln.engine.core import EngineCore
from kiln.engine.request import SamplingParams
from tests.helpers.tiny_models import write_tiny_model


class AllRowsGraphs:
    """DecodeGraphs' contract on CPU: logits of every input row, whatever the step's logits indices."""

    def __init__(self, runner):
        self.runner = runner
        self.replays = 0

    def fits(self, n: int, max_blocks: int) -> bool:
        return True

    def run(self, ids, pos, meta):
        self.replays += 1
        hidden = self.runner.model(ids, pos, self.runner.kv_caches, meta)
        return self.runner.model.compute_logits(hidden)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama"))


def run(model_dir, graphs: bool, device: str = "cpu"):
    # a budget of 4 tokens a step and 4 sequences: while three decode, the fourth prompt gets one token a step
    core = EngineCore(EngineConfig(model=str(model_dir), dtype="float32" if device == "cpu" else "bfloat16",
                                   block_size=16, num_gpu_blocks=64, max_num_seqs=4, max_num_batched_tokens=4,
                                   async_scheduling=False, device=device, use_cuda_graph=graphs))
    if device == "cpu":
        core.runner.graphs = AllRowsGraphs(core.runner) if graphs else None
    prompts = {"a": [5, 6], "b": [7, 8], "c": [9, 10], "d": [11, 12, 13, 14, 15, 16]}
    for i, (rid, p) in enumerate(prompts.items()):
        sp = SamplingParams(max_tokens=12, temperature=0.9, seed=100 + i, ignore_eos=True)
        assert core.add_request(rid, p, sp) is None
    out = {rid: [] for rid in prompts}
    errors = []
    one_token_chunk_steps = 0
    while core.has_unfinished():
        for o in core.step():
            out[o.request_id] += o.new_token_ids
            if o.error:
                errors.append((o.request_id, o.error))
        b = core.last_collected
        if b is not None and all(n == 1 for n in b.num_tokens) and b.num_prefill_tokens:
            one_token_chunk_steps += 1
    return out, errors, one_token_chunk_steps, core.runner.graphs


def test_decode_graph_step_with_a_one_token_prompt_chunk_samples_only_its_sampling_rows(model_dir):
    eager, eager_errors, _, _ = run(model_dir, graphs=False)
    graphed, errors, chunk_steps, stand_in = run(model_dir, graphs=True)
    assert not eager_errors and not errors, errors
    assert chunk_steps > 0 and stand_in.replays > 0   # the case arose, on the graph path
    assert graphed == eager and all(len(v) == 12 for v in graphed.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the real decode graphs: GPU only (the CPU test above "
                    "stands them in)")
def test_real_decode_graphs_with_a_one_token_prompt_chunk(model_dir):
    eager, _, _, _ = run(model_dir, graphs=False, device="cuda")
    graphed, errors, chunk_steps, graphs = run(model_dir, graphs=True, device="cuda")
    assert graphs is not None, "no decode graphs were captured"
    assert not errors and chunk_steps > 0
    assert graphed == eager
