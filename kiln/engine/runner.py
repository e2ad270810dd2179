"""Model runner: a scheduled batch -> input tensors -> model -> logits -> sampled tokens.

Owns the model, the KV cache tensors and the attention backend. Sizing the cache is done here because only
the runner knows the bytes per block and what the model left free.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from kiln import distributed as tpd
from kiln.engine.config import EngineConfig
from kiln.engine.request import PENDING_TOKEN, Request
from kiln.engine.sampler import PendingSample, Sampler, token_logprobs
from kiln.engine.scheduler import ScheduledBatch
from kiln.layers.attention import AttentionMetadata, LayerKVCache, make_attention_backend
from kiln.layers.lora import parse_lora_modules
from kiln.layers.moe import SparseMoE
from kiln.models.config import ModelConfig, resolve_dtype
from kiln.models.loader import load_model
from kiln.quantization.checkpoint import rank_kv_scales, resolve_kv_cache_dtype

log = logging.getLogger("kiln.runner")

GiB = 1 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but no CUDA GPU is visible")
    return dev


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_dir: str):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.model_config = ModelConfig.from_dir(model_dir)
        if cfg.enable_expert_parallel and not self.model_config.num_experts:
            raise ValueError(f"expert parallelism (KILN_ENABLE_EXPERT_PARALLEL) needs a mixture-of-experts model; "
                             f"{self.model_config.architecture} has no experts")
        self.model_config.expert_parallel = cfg.enable_expert_parallel
        self.dtype = resolve_dtype(cfg.dtype, self.device, self.model_config)
        torch.manual_seed(cfg.seed)
        t0 = time.monotonic()
        self.model = load_model(model_dir, self.dtype, self.device, cfg.load_format, cfg.quantization, cfg.seed,
                                cfg.quantize_lm_head, expert_parallel=cfg.enable_expert_parallel)
        self.lora = None  # kiln.layers.lora.LoRAState once an adapter is loaded
        for name, path in parse_lora_modules(cfg.lora_modules).items():  # KILN_LORA_MODULES: as if loaded now
            self.load_lora(name, path)
        self.load_seconds = time.monotonic() - t0
        self.startup_seconds: dict[str, float] = {"weights": self.load_seconds}
        self.kv_cache_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, self.model.quantization)
        # parameters, and the quantized weights that layers hold as plain tensors beside them
        quantized = [t for m in self.model.modules() for a in ("qweight", "scale", "head_qweight", "head_scale", "w13",
                                                              "w2")
                     if isinstance(t := getattr(m, a, None), torch.Tensor) and not isinstance(t, torch.nn.Parameter)]
        quantized += [t for m in self.model.modules() if isinstance(m, SparseMoE) for t in (m.scales or ())]
        self.weight_bytes = sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *quantized])
        self.backend = make_attention_backend(cfg.attention_backend, self.device)
        if (self.kv_cache_dtype == "fp8" and self.backend.name == "triton" and self.device.type == "cuda"
                and torch.cuda.get_device_capability(self.device) < (8, 9)):
            # Triton converts E4M3 (fp8e4nv) only on compute capability 8.9+ (Ada, Hopper)
            raise ValueError("the fp8 KV cache needs a GPU of compute capability 8.9+ (Ada, Hopper) for the Triton "
                             "attention kernels: use --kv-cache-dtype int8 or --attention-backend torch")
        for layer in self.model.model.layers:
            layer.self_attn.backend = self.backend
        self.sampler = Sampler()
        self.kv_caches: list[LayerKVCache] = []
        self.num_blocks = 0
        self.graphs = None
        # two pinned host buffers for the step's index tensors (CUDA), used in turn, each with the event of its
        # last copy to the device: a buffer is refilled only once that copy has run
        self._staging: list[torch.Tensor | None] = [None, None]
        self._staging_copied: list = [None, None]
        self._step_parity = 0
        self.last_sampled_ids: torch.Tensor | None = None  # device ids of the last step: in-flight tokens
        self.tp_group = None  # set by the engine core on rank 0 when MP_NUM > 1

    def load_lora(self, name: str, path: str, number: int | None = None) -> int:
        """Load a LoRA adapter (at start, or while serving); returns its number (`number`: the one rank 0 gave
        it)."""
        from kiln.layers.lora import LoRAState, read_adapter
        adapter = read_adapter(name, path, list(self.model.model.layers), self.dtype, self.device)
        if self.lora is None:
            self.lora = LoRAState(self.model)
        number = self.lora.add(adapter, number)
        log.info("LoRA adapter loaded: %s (rank %d, %d projections) from %s", name, adapter.rank,
                 len(adapter.weights), path)
        return number

    def unload_lora(self, name: str) -> None:
        self.lora.remove(name)
        log.info("LoRA adapter unloaded: %s", name)

    def max_model_len(self) -> int:
        """The configured length within the model's positions; with a sliding window, within the window: Kiln
        attends to the whole context, which is the window's attention only while the context fits in it."""
        mc = self.model_config
        limit = min(mc.max_position_embeddings, mc.sliding_window or mc.max_position_embeddings)
        if mc.sliding_window and (self.cfg.max_model_len or mc.max_position_embeddings) > mc.sliding_window:
            log.warning("the model attends to a sliding window of %d tokens, which Kiln does not implement: the "
                        "model length is capped at %d tokens, where whole-context attention is the same",
                        mc.sliding_window, limit)
        return min(self.cfg.max_model_len or limit, limit)

    # -- KV cache ----------------------------------------------------------------------------------
    @property
    def kv_int8(self) -> bool:
        return self.kv_cache_dtype == "int8"

    def bytes_per_block(self) -> int:
        mc = self.model_config
        kv_heads = max(1, mc.num_kv_heads // tpd.tp_size())
        eight_bit = self.kv_cache_dtype in ("int8", "fp8")
        per_token_head = mc.head_dim * (1 if eight_bit else torch.finfo(self.dtype).bits // 8)
        if self.kv_int8:
            per_token_head += 4  # float32 scale
        return 2 * mc.num_layers * self.cfg.block_size * kv_heads * per_token_head

    def decide_num_blocks(self, max_model_len: int) -> tuple[int, str]:
        cfg, bs = self.cfg, self.cfg.block_size
        if cfg.num_gpu_blocks:
            return cfg.num_gpu_blocks, "num_gpu_blocks setting"
        if cfg.block_bs:
            # the seed's formula: BLOCK_BS max-length sequences
            return int(cfg.block_bs * math.ceil(max_model_len / bs)), f"BLOCK_BS={cfg.block_bs} x {max_model_len} tokens"
        per_block = self.bytes_per_block()
        if self.device.type == "cuda":
            # memory this process's allocator holds but no tensor uses (a float checkpoint quantized at load leaves
            # its float weights there: run O, H200, w8a8-fp8 got no more cache blocks than bf16) is room for the
            # cache, not another process's
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free - torch.cuda.memory_reserved(self.device)  # read at the same moment
            peak = self.profile_activation_bytes()
            budget = (total * cfg.gpu_memory_utilization - torch.cuda.memory_allocated(self.device) - peak
                      - used_by_others - self.graph_reserve_bytes())
            self.activation_peak_bytes = peak
            n = int(budget // per_block)
            if n < 1:
                raise RuntimeError(
                    f"the model does not fit: weights {self.weight_bytes / GiB:.2f} GiB + activations "
                    f"{peak / GiB:.2f} GiB leave no room for a KV cache under gpu_memory_utilization="
                    f"{cfg.gpu_memory_utilization} of {total / GiB:.1f} GiB; lower MAX_SEQ_LEN / BATCH_SIZE, use "
                    f"quantization or more GPUs")
            return n, f"gpu_memory_utilization={cfg.gpu_memory_utilization} of {total / GiB:.1f} GiB"
        return max(1, int(cfg.cpu_kv_cache_gib * GiB // per_block)), f"cpu_kv_cache_gib={cfg.cpu_kv_cache_gib}"

    def graph_reserve_bytes(self) -> int:
        """What the decode CUDA graphs keep, captured after the cache is sized: the logits buffer they share
        (max_num_seqs rows in the model's dtype) and, in their pool, the largest graph's LM-head output copied
        into it."""
        if not (self.cfg.use_cuda_graph and self.device.type == "cuda" and self.backend.name == "triton"):
            return 0
        return self.cfg.max_num_seqs * self.model_config.vocab_size * 2 * self.dtype.itemsize

    def profile_activation_bytes(self) -> int:
        """Peak extra memory of a forward pass at the full token budget (on GPU)."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        n = self.cfg.max_num_batched_tokens or 2048
        self._dummy_forward(n)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(self.device) - base

    def _dummy_forward(self, num_tokens: int) -> None:
        mc = self.model_config
        bs = self.cfg.block_size
        nblk = -(-num_tokens // bs)
        kvh = max(1, mc.num_kv_heads // tpd.tp_size())
        k = torch.zeros(nblk, bs, kvh, mc.head_dim, dtype=self.dtype, device=self.device)
        caches = [LayerKVCache(k, torch.zeros_like(k)) for _ in range(mc.num_layers)]
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            block_tables=torch.arange(nblk, dtype=torch.int32, device=self.device)[None],
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens_list=[num_tokens], query_lens_list=[num_tokens], max_query_len=num_tokens,
            max_seq_len=num_tokens)
        with torch.inference_mode():
            h = self.model(ids, torch.arange(num_tokens, device=self.device), caches, meta)
            self.model.compute_logits(h[-self.cfg.max_num_seqs:])
        del caches, k

    def allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        kvh = max(1, mc.num_kv_heads // tpd.tp_size())
        shape = (mc.num_layers, 2, num_blocks, self.cfg.block_size, kvh, mc.head_dim)
        dtype = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}.get(self.kv_cache_dtype, self.dtype)
        self.kv_tensor = torch.zeros(shape, dtype=dtype, device=self.device)
        scales = None
        if self.kv_int8:
            scales = torch.zeros(shape[:-1], dtype=torch.float32, device=self.device)
        elif self.kv_cache_dtype == "fp8":  # static per-layer, per-head scales: [layers, 2 (k, v), kv heads]
            scales = torch.stack([torch.stack([
                rank_kv_scales(s, mc.num_kv_heads, tpd.tp_rank(), tpd.tp_size()) for s in layer])
                for layer in self.model.kv_cache_scales]).to(self.device)
        self.kv_caches = [
            LayerKVCache(self.kv_tensor[i, 0], self.kv_tensor[i, 1],
                         None if scales is None else scales[i, 0], None if scales is None else scales[i, 1])
            for i in range(mc.num_layers)
        ]
        self.num_blocks = num_blocks

    # -- one step ----------------------------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch) -> tuple["StepInputs", list[Request]]:
        """Host-side inputs of one step (plain lists: cheap to build, and to send to tensor-parallel ranks)."""
        bs = self.cfg.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        qlens, slens, logits_idx, sampling, tables = [], [], [], [], []
        fix_dst: list[int] = []
        fix_src: list[int] = []
        prompt_rows: list[int] = []
        prompt_targets: list[int] = []
        prompt_spans: list[tuple[Request, int, int]] = []
        token_adapters: list[int] = []  # each input token's LoRA adapter (0: none), with adapters loaded
        embed_rows: list[int] = []      # the last prompt rows of embedding requests ...
        embed_reqs: list[Request] = []  # ... and those requests
        for req, n in zip(batch.requests, batch.num_tokens):
            if self.lora is not None:
                token_adapters.extend([req.lora_index] * n)  # n: also a speculating row's draft rows
            start = req.num_computed_tokens
            end = start + n
            if req.draft_token_ids:
                # speculative decoding (kiln/engine/speculative.py): the known token at `start` (a prompt's last
                # where its last chunk is that one token) and each draft a decode row of its own, on the request's
                # blocks, seeing the positions before it (the step's cache writes come before its attention), so
                # the step stays a decode step (its CUDA graphs)
                known = (req.prompt_token_ids[start] if start < req.num_prompt_tokens
                         else req.output_token_ids[start - req.num_prompt_tokens])
                for j, tok in enumerate([known, *req.draft_token_ids]):
                    ids.append(tok)
                    pos.append(start + j)
                    slots.append(req.block_ids[(start + j) // bs] * bs + (start + j) % bs)
                    tables.append(req.block_ids)
                    qlens.append(1)
                    slens.append(start + j + 1)
                    logits_idx.append(len(ids) - 1)
                sampling.append(req)
                continue
            toks = req.all_token_ids[start:end] if start < req.num_prompt_tokens else req.output_token_ids[
                start - req.num_prompt_tokens:end - req.num_prompt_tokens]
            ids.extend(toks)
            if toks[-1] == PENDING_TOKEN:  # sampled by the step still in flight: read it on the device
                fix_dst.append(len(ids) - 1)
                fix_src.append(req.pending_row)
            pos.extend(range(start, end))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            tables.append(blocks)
            qlens.append(n)
            slens.append(end)
            if end == req.num_tokens and req.params.embed:  # its answer: the last row's hidden state
                embed_rows.append(len(ids) - 1)
                embed_reqs.append(req)
            elif end == req.num_tokens:  # caught up with all known tokens: the model's output is a new token
                logits_idx.append(len(ids) - 1)
                sampling.append(req)
            if req.params.prompt_logprobs is not None:
                # position p predicts prompt token p + 1; those already scored (before a preemption) are skipped
                lo, hi = max(start, len(req.prompt_logprobs)), min(end, req.num_prompt_tokens - 1)
                if lo < hi:
                    first_row = len(ids) - n + lo - start
                    prompt_rows.extend(range(first_row, first_row + hi - lo))
                    prompt_targets.extend(req.prompt_token_ids[lo + 1:hi + 1])
                    prompt_spans.append((req, lo, hi - lo))
        top_k = max((r.params.prompt_logprobs for r, _, _ in prompt_spans), default=0)
        return StepInputs(ids, pos, slots, tables, qlens, slens, logits_idx, fix_dst, fix_src, prompt_rows,
                          prompt_targets, top_k, prompt_spans, token_adapters, embed_rows, embed_reqs), sampling

    def step_buffer(self, size: int) -> torch.Tensor:
        """A host int64 buffer for one step's packed inputs: on CUDA one of two pinned buffers used in turn (a
        buffer is refilled only once its last copy to the device has run), on CPU a fresh one per step (the
        device tensors alias it)."""
        if self.device.type != "cuda":
            return torch.empty(size, dtype=torch.int64)
        k = self._step_parity = 1 - self._step_parity
        if self._staging_copied[k] is not None:
            self._staging_copied[k].synchronize()  # two steps ago: long done
        if self._staging[k] is None or self._staging[k].numel() < size:
            old = 0 if self._staging[k] is None else self._staging[k].numel()
            self._staging[k] = torch.empty(max(size, 2 * old), dtype=torch.int64, pin_memory=True)
        return self._staging[k][:size]

    def pack(self, s: "StepInputs") -> "PackedStep":
        """All of a step's index tensors in one int64 host buffer (built with numpy: per-row torch.tensor calls
        cost ~1 ms per step at batch 64): one host->device copy, and what tensor-parallel ranks receive."""
        n, t = len(s.block_tables), len(s.input_ids)
        nl, nf, npr = len(s.logits_indices), len(s.pending_dst), len(s.prompt_rows)
        width = max(len(b) for b in s.block_tables)
        p = PackedStep(None, t, n, nl, nf, width, npr, s.prompt_top_k, s.token_adapters, len(s.embed_rows))
        host = p.host = self.step_buffer(p.size)
        buf = host.numpy()
        buf[0:t] = s.input_ids
        buf[t:2 * t] = s.positions
        buf[2 * t:3 * t] = s.slots
        o = 3 * t
        buf[o:o + nl] = s.logits_indices
        buf[o + nl:o + nl + nf] = s.pending_dst
        buf[o + nl + nf:o + nl + 2 * nf] = s.pending_src
        o += nl + 2 * nf
        buf[o:o + npr] = s.prompt_rows
        buf[o + npr:o + 2 * npr] = s.prompt_targets
        o += 2 * npr
        buf[o:o + p.num_embed_rows] = s.embed_rows
        o += p.num_embed_rows
        buf[o:o + n] = s.seq_lens
        buf[o + n] = 0
        np.cumsum(s.query_lens, out=buf[o + n + 1:o + 2 * n + 1])
        table = buf[o + 2 * n + 1:].reshape(n, width)
        lens = np.fromiter(map(len, s.block_tables), dtype=np.int64, count=n)
        # rows are ragged: fill the valid prefix of every row in one masked assignment (row-major = chain order)
        filled = np.arange(width) < lens[:, None]
        table[~filled] = 0
        table[filled] = np.fromiter(itertools.chain.from_iterable(s.block_tables), dtype=np.int64,
                                    count=int(lens.sum()))
        return p

    def to_device(self, s: "StepInputs") -> "DeviceStep":
        return self.upload(self.pack(s))

    def upload(self, p: "PackedStep") -> "DeviceStep":
        """The packed step on the device, and its attention metadata. Nothing here waits for the GPU, so the
        step can be queued while the previous one runs."""
        dev = self.device
        t, n, nl, nf, npr, width = p.num_tokens, p.num_seqs, p.num_logits, p.num_pending, p.num_prompt_rows, p.width
        d = p.host.to(dev, non_blocking=True)
        if dev.type == "cuda":
            self._staging_copied[self._step_parity] = torch.cuda.Event()
            self._staging_copied[self._step_parity].record()
        ids = d[:t]
        if nf:
            if self.last_sampled_ids is None:
                raise RuntimeError("a step reads in-flight tokens but no step has sampled")
            o = 3 * t + nl
            ids[d[o:o + nf]] = self.last_sampled_ids[d[o + nf:o + 2 * nf]]
        o = 3 * t + nl + 2 * nf
        prompt_rows, prompt_targets = d[o:o + npr], d[o + npr:o + 2 * npr]
        o += 2 * npr
        embed_rows = d[o:o + p.num_embed_rows]
        o += p.num_embed_rows
        lens = p.host[o:o + 2 * n + 1].numpy()  # host lists for the attention backends: from the buffer, so
        seq_lens = lens[:n].tolist()            # tensor-parallel ranks, which only receive it, get them too
        query_lens = np.diff(lens[n:]).tolist()
        ints = d[o:].to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=d[2 * t:3 * t], block_tables=ints[2 * n + 1:].view(n, width), seq_lens=ints[:n],
            query_start_loc=ints[n:2 * n + 1], seq_lens_list=seq_lens, query_lens_list=query_lens,
            max_query_len=max(query_lens), max_seq_len=max(seq_lens),
            num_decode_rows=next((i for i, q in enumerate(query_lens) if q != 1), n))
        return DeviceStep(ids, d[t:2 * t], meta, d[3 * t:3 * t + nl], prompt_rows, prompt_targets, embed_rows)

    def capture_cuda_graphs(self, max_model_len: int) -> None:
        """Decode graphs need the Triton backend (the torch one loops over Python lists)."""
        if not (self.cfg.use_cuda_graph and self.device.type == "cuda" and self.backend.name == "triton"):
            return
        from kiln.engine.cuda_graph import DecodeGraphs
        self.graphs = DecodeGraphs(self.model, self.kv_caches, self.device, self.cfg.max_num_seqs,
                                   -(-max_model_len // self.cfg.block_size), logits_dtype=self.dtype)
        self.graphs.capture()

    def forward(self, s: "StepInputs") -> torch.Tensor | None:
        return self.forward_packed(self.pack(s))[0]

    @torch.inference_mode()
    def forward_packed(self, p: "PackedStep"
                       ) -> tuple[torch.Tensor | None, PendingSample | None, torch.Tensor | None]:
        """Logits of the rows that sample, and only of those: a prefill chunk that samples nothing skips the LM
        head (and its all-gather); the prompt logprobs the step computes, if any; and the embedding requests'
        answers (their last rows' final hidden states, L2-normalized, float32), if any. All ranks run this in
        lockstep under tensor parallelism."""
        if self.lora is None:
            return self._forward_packed(p)
        self.lora.set_step(p.token_adapters or [], self.device)
        try:
            return self._forward_packed(p)
        finally:
            self.lora.clear()

    def _forward_packed(self, p: "PackedStep"
                        ) -> tuple[torch.Tensor | None, PendingSample | None, torch.Tensor | None]:
        ids, pos, meta, logits_indices, prompt_rows, prompt_targets, embed_rows = self.upload(p)
        lora = self.lora is not None and self.lora.active  # adapters' deltas run eagerly, outside the graphs
        if (self.graphs is not None and meta.decode_only and not lora and not p.num_embed_rows
                and self.graphs.fits(len(ids), meta.block_tables.shape[1])):
            all_logits = self.graphs.run(ids, pos, meta)  # every row's
            prompt = self._prompt_logprobs(p, lambda rows: all_logits[rows], prompt_rows, prompt_targets)
            if p.num_logits == len(ids):
                return all_logits, prompt, None
            # a row that does not sample: a one-token prompt chunk (the step's budget had one token left)
            return (all_logits[logits_indices] if p.num_logits else None), prompt, None
        hidden = self.model(ids, pos, self.kv_caches, meta)
        prompt = self._prompt_logprobs(p, lambda rows: self.model.compute_logits(hidden[rows]), prompt_rows,
                                       prompt_targets)
        embeds = (torch.nn.functional.normalize(hidden[embed_rows].float(), dim=-1)
                  if p.num_embed_rows and tpd.tp_rank() == 0 else None)
        if not p.num_logits:
            return None, prompt, embeds
        return self.model.compute_logits(hidden[logits_indices]), prompt, embeds

    def _prompt_logprobs(self, p: "PackedStep", logits_of, rows: torch.Tensor,
                         targets: torch.Tensor) -> PendingSample | None:
        """The log-softmax of the model's logits at the prompt rows (token_logprobs): each row's next prompt
        token's logprob and the top p.prompt_top_k, on their way to the host (the targets stand as the "sampled"
        ids). In slices of at most max_num_seqs rows, the most logits a sampling step holds, so a long prefill
        chunk needs no more memory than the cache sizing left."""
        if not p.num_prompt_rows:
            return None
        k, size = p.prompt_top_k, self.cfg.max_num_seqs
        reader = tpd.tp_rank() == 0  # the other ranks take part in the LM head's all-gather, nothing more
        chosen, top_vals, top_idx = [], [], []
        for i in range(0, p.num_prompt_rows, size):
            logits = logits_of(rows[i:i + size])
            if not reader:
                continue
            c, vals, idx = token_logprobs(torch.log_softmax(logits.float(), dim=-1), targets[i:i + size], k)
            chosen.append(c)
            if k:
                top_vals.append(vals)
                top_idx.append(idx)
        if not reader:
            return None
        return PendingSample(targets, [k] * p.num_prompt_rows, torch.cat(chosen),
                             torch.cat(top_vals) if k else None, torch.cat(top_idx) if k else None)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> "Launched":
        """Queue one step's forward without waiting for it: the requests that sample, their logits (None if
        nobody samples), the prompt logprobs the step computes and the embedding requests' answers (None if none).
        `sample` must follow before the next launch (its ids are that step's inputs)."""
        inputs, sampling = self.prepare(batch)
        packed = self.pack(inputs)
        if self.tp_group is not None:
            self.tp_group.send_step(packed, self.last_sampled_ids)
        logits, prompt, embeds = self.forward_packed(packed)
        embeddings = (inputs.embed_reqs, embeds) if inputs.embed_reqs else None
        if prompt is None:
            return Launched(sampling, logits, None, embeddings)
        # each row keeps as many top logprobs as its request asked (the step computed the most any asked)
        prompt.num_logprobs = [r.params.prompt_logprobs for r, _, rows in inputs.prompt_spans for _ in range(rows)]
        return Launched(sampling, logits, PromptLogprobs(inputs.prompt_spans, prompt), embeddings)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, sampling: list[Request]) -> PendingSample:
        """One row per logit row: a speculating request's (num_sample_rows) are each sampled with its settings."""
        rows = sampling if len(logits) == len(sampling) else [r for r in sampling for _ in range(r.num_sample_rows)]
        pending = self.sampler.sample(logits, rows)
        self.last_sampled_ids = pending.ids
        return pending


@dataclass
class StepInputs:
    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    block_tables: list[list[int]]
    query_lens: list[int]
    seq_lens: list[int]
    logits_indices: list[int]
    pending_dst: list[int]      # input positions whose token is still in flight ...
    pending_src: list[int]      # ... and its row in the last step's sampled ids
    prompt_rows: list[int] = field(default_factory=list)     # input positions whose prompt logprobs are asked ...
    prompt_targets: list[int] = field(default_factory=list)  # ... and the prompt token each one predicts
    prompt_top_k: int = 0       # top logprobs per prompt row (the most any of the step's requests asks)
    # (request, first prompt position, rows) of each request's prompt rows, in order (host only, not packed)
    prompt_spans: list = field(default_factory=list)
    token_adapters: list[int] = field(default_factory=list)  # each input token's LoRA adapter (host only)
    embed_rows: list[int] = field(default_factory=list)       # embedding requests' last prompt rows ...
    embed_reqs: list = field(default_factory=list)            # ... and those requests (host only)


class Launched(NamedTuple):
    """A queued step: the requests that sample and their logits, its prompt logprobs, and its embedding requests
    with their answers on the device ([requests], [rows, hidden] float32)."""
    sampling: list[Request]
    logits: torch.Tensor | None
    prompt: "PromptLogprobs | None"
    embeddings: "tuple[list[Request], torch.Tensor] | None"


class DeviceStep(NamedTuple):
    """A step's inputs on the device (views of its one packed copy) and its attention metadata."""
    ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows that sample
    prompt_rows: torch.Tensor     # rows whose prompt logprobs are asked ...
    prompt_targets: torch.Tensor  # ... and the prompt token each one predicts
    embed_rows: torch.Tensor      # rows whose final hidden state is an embedding request's answer


@dataclass
class PromptLogprobs:
    """One step's prompt logprobs: which request's positions its rows are, and the rows on their way to the host
    (a PendingSample whose "sampled" ids are the prompt tokens)."""
    spans: list[tuple[Request, int, int]]
    pending: PendingSample


@dataclass
class PackedStep:
    """A step's inputs in one int64 host buffer; the sizes say where each part lies. Layout:
    ids[t] | positions[t] | slots[t] | logits_indices[nl] | pending_dst[nf] | pending_src[nf] | prompt_rows[np] |
    prompt_targets[np] | embed_rows[ne] | seq_lens[n] | query_start_loc[n+1] | block_tables[n*width]"""
    host: torch.Tensor | None
    num_tokens: int     # t
    num_seqs: int       # n
    num_logits: int     # nl: rows that sample
    num_pending: int    # nf: input tokens still in flight (read from the last step's sampled ids)
    width: int          # block-table columns
    num_prompt_rows: int = 0  # np: rows whose prompt logprobs are asked
    prompt_top_k: int = 0
    token_adapters: list[int] | None = None  # each input token's LoRA adapter (rank 0 only: not in the buffer)
    num_embed_rows: int = 0  # ne: embedding requests' last rows

    @property
    def size(self) -> int:
        t, n = self.num_tokens, self.num_seqs
        return (3 * t + self.num_logits + 2 * self.num_pending + 2 * self.num_prompt_rows + self.num_embed_rows
                + 2 * n + 1 + n * self.width)
