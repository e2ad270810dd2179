"""Tensor parallelism (MP_NUM): ranks 1..N-1 are worker processes that replay each step of rank 0.

Rank 0 (the engine core) schedules and samples. Every step it sends the step's packed inputs (runner.PackedStep:
a sizes header, then one flat int64 buffer) host to host over gloo, then all ranks run the sharded model in
lockstep (all-reduce after row-parallel layers, all-gather of the logits of the rows that sample). NCCL on GPUs,
gloo on CPU (which is how CI tests it).

Async scheduling: rank 0 queues step N+1 before step N's sampled ids reach its host, so step N+1's inputs hold
placeholders that each rank fills on its device from step N's sampled ids. Only rank 0 samples: the sampler's
state (per-request seeded generators, penalties over the output, grammar matchers) lives with the requests on
rank 0, and replicating it on every rank would be a second home for it. So a step that reads in-flight tokens
carries rank 0's last sampled ids to the other ranks as one device broadcast, queued behind the sampling on
rank 0's stream (no host wait on any rank).

Start-up checks (`check_fit`): head counts that do not split, more ranks than GPUs, and per-rank weights larger
than a GPU fail at once with one line that names the numbers and the MP_NUM values that would work.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import socket
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from kiln import distributed as tpd
from kiln.engine.config import EngineConfig
from kiln.models.config import ModelConfig

log = logging.getLogger("kiln.tp")

GiB = 1 << 30
# header of a step message: kind, then PackedStep's sizes, the number of last sampled ids that follow, whether
# each token's LoRA adapter follows, and the embedding rows in the packed inputs. LORA: an adapter loaded or
# unloaded while serving (the header's second field: its number, 0 to unload; third: the bytes of its JSON that
# follow)
STEP, STOP, LORA = 1, 2, 3
HEADER_LEN = 11
CANDIDATE_SIZES = range(1, 9)  # MP_NUM values suggested in errors: the GPUs of one host


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(cfg: EngineConfig) -> str:
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def _bind_device(rank: int, backend: str) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)


# -- does MP_NUM fit? ----------------------------------------------------------------------------------
def head_split_problem(mc: ModelConfig, tp: int) -> str | None:
    """Why the model's layers cannot be split over tp ranks, or None. KV heads fewer than the ranks are
    replicated (each rank holds one KV head's copy), so tp must then be a multiple of the KV head count."""
    if mc.num_heads % tp:
        return f"{mc.num_heads} attention heads"
    if mc.num_kv_heads % tp and tp % mc.num_kv_heads:
        return f"{mc.num_kv_heads} KV heads (neither divides the other)"
    if mc.intermediate_size % tp:
        return f"intermediate size {mc.intermediate_size}"
    if mc.num_experts and mc.expert_parallel and mc.num_experts % tp:
        return f"{mc.num_experts} experts (expert parallelism deals whole experts to the ranks)"
    if mc.num_experts and not mc.expert_parallel and mc.moe_intermediate_size % tp:
        return f"expert intermediate size {mc.moe_intermediate_size}"
    if mc.shared_expert_intermediate_size % tp:
        return f"shared expert intermediate size {mc.shared_expert_intermediate_size}"
    return None


def weight_bytes_per_rank(mc: ModelConfig, tp: int, dtype: torch.dtype, quantization: str | None) -> int:
    """The bytes of one rank's shard of the weights, from the config alone (before anything is loaded)."""
    el = torch.finfo(dtype).bits // 8
    d, h = mc.head_dim, mc.hidden_size
    q, kv = mc.num_heads // tp * d, max(1, mc.num_kv_heads // tp) * d
    inter = mc.intermediate_size // tp
    attention = [(q + 2 * kv, h), (h, q)]  # qkv, o
    mlp = [(2 * inter, h), (h, inter)]  # gate_up, down
    if mc.expert_parallel:  # whole experts, E / tp of them
        experts = [(2 * mc.moe_intermediate_size, h), (h, mc.moe_intermediate_size)] * (mc.num_experts // tp)
    else:
        experts = [(2 * mc.moe_intermediate_size // tp, h), (h, mc.moe_intermediate_size // tp)] * mc.num_experts
    shared = mc.shared_expert_intermediate_size // tp
    experts_other = (mc.num_experts + (1 if shared else 0)) * h * el  # the router's rows and the shared gate's
    if shared:
        experts += [(2 * shared, h), (h, shared)]
    int8 = quantization == "w8a16"

    def linear(out_in: list[tuple[int, int]]) -> int:
        return sum(o * i * (1 if int8 else el) + (4 * o if int8 else 0) for o, i in out_in)

    other = (2 * h + (2 * d if mc.qk_norm else 0) + ((q + 2 * kv) if mc.qkv_bias else 0)) * el
    layers = sum(linear(attention) + other + (linear(experts) + experts_other if mc.is_moe_layer(i)
                                              else linear(mlp)) for i in range(mc.num_layers))
    vocab = -(-mc.vocab_size // tp) * h * el * (1 if mc.tie_word_embeddings else 2)
    return layers + vocab + h * el


def check_fit(mc: ModelConfig, tp: int, dtype: torch.dtype, quantization: str | None,
              visible_gpus: int | None = None, gpu_bytes: int | None = None,
              gpu_memory_utilization: float = 0.9) -> None:
    """Raise ValueError (one line: the numbers, and the MP_NUM values that would work) when the model cannot
    run on tp ranks. visible_gpus / gpu_bytes: None on CPU (no device count or memory limit)."""
    def fits(t: int) -> bool:
        if head_split_problem(mc, t) or (visible_gpus is not None and t > visible_gpus):
            return False
        return gpu_bytes is None or weight_bytes_per_rank(mc, t, dtype, quantization) < gpu_bytes * gpu_memory_utilization

    def working() -> str:
        ok = [str(t) for t in CANDIDATE_SIZES if fits(t)]
        return f"MP_NUM={' or '.join(ok)} would work" if ok else "no MP_NUM up to 8 would work"

    what = head_split_problem(mc, tp)
    if what:
        raise ValueError(f"MP_NUM={tp} does not fit the model: {what} cannot be split over {tp} ranks "
                         f"({mc.num_heads} heads, {mc.num_kv_heads} KV heads, intermediate size "
                         f"{mc.intermediate_size}); {working()}")
    if visible_gpus is not None and tp > visible_gpus:
        raise ValueError(f"MP_NUM={tp} needs {tp} GPUs, {visible_gpus} visible (CUDA_VISIBLE_DEVICES); "
                         f"{working()}")
    if gpu_bytes is not None:
        need = weight_bytes_per_rank(mc, tp, dtype, quantization)
        room = gpu_bytes * gpu_memory_utilization
        if need >= room:
            raise ValueError(
                f"MP_NUM={tp} does not fit in GPU memory: each rank holds {need / GiB:.2f} GiB of weights, a GPU "
                f"has {room / GiB:.2f} GiB under gpu_memory_utilization={gpu_memory_utilization} of "
                f"{gpu_bytes / GiB:.1f} GiB, and the KV cache and activations need room too; {working()}"
                + ("" if quantization == "w8a16" else " (or use w8a16 quantization)"))


def check_config_fits(cfg: EngineConfig, model_dir: str) -> None:
    """check_fit for an engine config, with the GPUs this process sees (before any rank starts)."""
    from kiln.engine.runner import resolve_device
    from kiln.models.config import resolve_dtype

    mc = ModelConfig.from_dir(model_dir)
    mc.expert_parallel = cfg.enable_expert_parallel
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device, mc)
    visible = gpu_bytes = None
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        gpu_bytes = min(torch.cuda.get_device_properties(i).total_memory
                        for i in range(min(visible, cfg.tensor_parallel_size)))
    check_fit(mc, cfg.tensor_parallel_size, dtype, cfg.quantization, visible, gpu_bytes,
              cfg.gpu_memory_utilization)


# -- start-up --------------------------------------------------------------------------------------------
@contextmanager
def _timed(phases: dict[str, float], name: str):
    t0 = time.monotonic()
    yield
    phases[name] = time.monotonic() - t0


def build_runner(cfg: EngineConfig, model_dir: str):
    """Same sequence of collectives on every rank: load, size the cache (min over ranks), allocate, capture,
    then rank 0 logs every rank's memory plan."""
    from kiln.engine.runner import ModelRunner
    t0 = time.monotonic()
    runner = ModelRunner(cfg, model_dir)
    phases = runner.startup_seconds  # seconds per start-up phase, logged by the engine core once it is ready
    phases["model runner (weights included)"] = time.monotonic() - t0
    max_len = runner.max_model_len()
    with _timed(phases, "cache sizing (activation profile)"):
        n, why = runner.decide_num_blocks(max_len)
    if tpd.tp_size() > 1:
        t = torch.tensor([n], dtype=torch.long, device=runner.device if _backend(cfg) == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        n = int(t.item())
    with _timed(phases, "KV cache allocation"):
        runner.allocate_kv_cache(n)
    with _timed(phases, "CUDA graphs"):
        runner.capture_cuda_graphs(max_len)
    if tpd.tp_size() > 1:
        plans = [None] * tpd.tp_size()
        dist.all_gather_object(plans, memory_plan(runner), group=tpd.host_group())
        if tpd.tp_rank() == 0:
            for rank, plan in enumerate(plans):
                log.info("memory plan, rank %d of %d: %s", rank, tpd.tp_size(), plan)
    return runner, n, why


def memory_plan(runner) -> str:
    """One rank's bytes: weights, KV cache, activation peak (profiled on GPU), CUDA graphs."""
    act = getattr(runner, "activation_peak_bytes", None)
    graphs = getattr(runner.graphs, "graph_bytes", None)
    kv = runner.num_blocks * runner.bytes_per_block()
    parts = [f"weights {runner.weight_bytes / GiB:.3f} GiB",
             f"KV cache {kv / GiB:.3f} GiB ({runner.num_blocks} blocks)",
             "activations " + ("n/a (CPU)" if act is None else f"{act / GiB:.3f} GiB")]
    if graphs is not None:
        parts.append(f"CUDA graphs {graphs / GiB:.3f} GiB")
    return ", ".join(parts) + f" on {runner.device}"


class TPGroup:
    """Rank 0's side: starts the worker ranks and sends them each step."""

    def __init__(self, cfg: EngineConfig, model_dir: str):
        self.size = cfg.tensor_parallel_size
        check_config_fits(cfg, model_dir)  # before any process starts: a clear error, not a hung collective
        backend = _backend(cfg)
        init = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=tp_worker_main, args=(cfg, model_dir, r, init), daemon=True,
                                  name=f"kiln-tp-rank{r}") for r in range(1, self.size)]
        for p in self.procs:
            p.start()
        _bind_device(0, backend)
        tpd.init_tensor_parallel(0, self.size, init, backend)
        log.info("tensor parallel: %d ranks over %s", self.size, backend)

    def send_step(self, p, last_sampled_ids: torch.Tensor | None) -> None:
        """The step's sizes and packed inputs (host to host), then, if the step reads tokens still in flight,
        the last sampled ids (device to device, queued behind the sampling that makes them)."""
        n_ids = last_sampled_ids.numel() if p.num_pending else 0
        adapters = any(p.token_adapters or ())  # LoRA rows: each token's adapter follows the packed inputs
        header = torch.tensor([STEP, p.num_tokens, p.num_seqs, p.num_logits, p.num_pending, p.width, n_ids,
                               p.num_prompt_rows, p.prompt_top_k, int(adapters), p.num_embed_rows],
                              dtype=torch.int64)
        dist.broadcast(header, 0, group=tpd.host_group())
        dist.broadcast(p.host, 0, group=tpd.host_group())
        if adapters:
            dist.broadcast(torch.tensor(p.token_adapters, dtype=torch.int64), 0, group=tpd.host_group())
        if n_ids:
            dist.broadcast(last_sampled_ids, 0)

    def send_lora(self, number: int, name: str, path: str) -> bool:
        """Every rank loads adapter `name` from `path` as number `number` (0: every rank forgets `name`); False when
        a rank could not (then none keeps it: the caller forgets it on rank 0)."""
        payload = torch.frombuffer(bytearray(json.dumps({"name": name, "path": path}).encode()), dtype=torch.uint8)
        header = torch.tensor([LORA, number, payload.numel()] + [0] * (HEADER_LEN - 3), dtype=torch.int64)
        dist.broadcast(header, 0, group=tpd.host_group())
        dist.broadcast(payload, 0, group=tpd.host_group())
        failed = torch.zeros(1, dtype=torch.int64)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=tpd.host_group())
        return not failed.item()

    def shutdown(self) -> None:
        try:
            dist.broadcast(torch.tensor([STOP] + [0] * (HEADER_LEN - 1), dtype=torch.int64), 0,
                           group=tpd.host_group())
        except Exception:  # noqa: BLE001 - a rank may already be gone
            pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
        tpd.destroy_tensor_parallel()


def receive_step(runner):
    """A worker's side of send_step: the PackedStep of rank 0's next step (the runner's last sampled ids set
    if the step reads them), or None when rank 0 stops."""
    from kiln.engine.runner import PackedStep
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    dist.broadcast(header, 0, group=tpd.host_group())
    kind, t, n, nl, nf, width, n_ids, npr, top_k, adapters, ne = header.tolist()
    while kind == LORA:  # rank 0 loaded its adapter first: the files are good
        payload = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(payload, 0, group=tpd.host_group())
        lora = json.loads(bytes(payload.tolist()).decode())
        failed = torch.zeros(1, dtype=torch.int64)
        try:
            if t:
                runner.load_lora(lora["name"], lora["path"], number=t)
            else:
                runner.unload_lora(lora["name"])
        except Exception as e:  # noqa: BLE001 - told to every rank; this one serves on
            log.error("rank %d: LoRA adapter %r: %s", tpd.tp_rank(), lora["name"], e)
            failed[0] = 1
        ok = not failed.item()
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=tpd.host_group())
        if t and ok and failed.item():  # another rank could not load it: no rank keeps it
            runner.unload_lora(lora["name"])
        dist.broadcast(header, 0, group=tpd.host_group())
        kind, t, n, nl, nf, width, n_ids, npr, top_k, adapters, ne = header.tolist()
    if kind == STOP:
        return None
    p = PackedStep(None, t, n, nl, nf, width, npr, top_k, num_embed_rows=ne)
    p.host = runner.step_buffer(p.size)
    dist.broadcast(p.host, 0, group=tpd.host_group())
    if adapters:
        token_adapters = torch.empty(t, dtype=torch.int64)
        dist.broadcast(token_adapters, 0, group=tpd.host_group())
        p.token_adapters = token_adapters.tolist()
    if n_ids:
        ids = torch.empty(n_ids, dtype=torch.int64, device=runner.device)
        dist.broadcast(ids, 0)
        runner.last_sampled_ids = ids
    return p


def tp_worker_main(cfg: EngineConfig, model_dir: str, rank: int, init: str) -> None:
    backend = _backend(cfg)
    _bind_device(rank, backend)
    tpd.init_tensor_parallel(rank, cfg.tensor_parallel_size, init, backend)
    runner, _, _ = build_runner(cfg, model_dir)
    while (p := receive_step(runner)) is not None:
        runner.forward_packed(p)
    tpd.destroy_tensor_parallel()
