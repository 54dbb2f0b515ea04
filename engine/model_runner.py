"""Owns the model, the KV pool and the device: turns a scheduled batch into flat
tensors, runs the forward (through a captured CUDA graph for decode batches),
and returns the logits rows that need sampling."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.block_table import BlockTable
from engine.cascade_plan import MAX_GROUPS, CascadePlanner
from engine.pinned_upload import PinnedUpload
from engine.config import EngineConfig
from engine.models.llama import AttentionMetadata, CascadeMetadata
from engine.models.loader import build_model
from engine.scheduler import ScheduledBatch
from kernels import ops

log = logging.getLogger(__name__)

# Steps whose sequences each bring at most this many new tokens run as decode steps with one
# row per token (see ModelRunner.prepare); larger chunks go through the extend kernel. 16:
# verification of up to 15 drafts per request (`--num-speculative-tokens` up to 15).
MAX_ROWS_AS_DECODE = 16
# Steps with prefill chunks run that way too (through the captured decode graphs) when their
# rows fit the largest graph and read at most this many KV positions in all: an admission in
# the middle of a run is then one graph replay, not an eager step (about 15 ms of kernel
# launches on SmolLM2 against 2.5 ms for a captured decode step at batch 32). Models with
# narrow KV rows may read more positions, up to MAX_DECODE_ROW_READ_BYTES of KV in all
# (rows of one sequence read the same blocks, mostly from L2): about 280k positions on SmolLM2.
MAX_DECODE_ROW_READS = 65536
MAX_DECODE_ROW_READ_BYTES = 6 << 30
# The decode graphs cover at least this many rows, for those admissions: sized for the batch alone
# (32 rows at max_num_seqs = 32, no speculation) every admission mid-run went eager. Measured on
# the H200, SmolLM2 fp32, open chat at batch 32: 25 eager admissions of about 15 ms, 370 of a
# run's 1,371 ms, where the speculating engines (graphs to 288 rows) replayed theirs in ~3 ms.
ADMISSION_GRAPH_ROWS = 256
# Decode steps with at least this many rows try shared-prefix (cascade) attention on the GPU;
# below it attention is a small part of the step and the plan's host time would not pay.
CASCADE_MIN_ROWS = 32
# ... and only for models whose KV rows are wide enough for the reads saved to beat the two
# extra kernels per layer. Measured on the H100 (bench/results/prefix-*-h100.json): Qwen3-0.6B
# (8 KV heads x 128) gains 1.12-1.44x end to end, SmolLM2 (3 x 64) loses 0.71-0.89x.
CASCADE_MIN_KV_WIDTH = 512


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the flat batch whose logits are sampled
    sample_rows: list[int]  # batch positions (into batch.requests) that sample
    rows_per_req: list[int]  # scored positions per sampling request (1 + drafts)
    context_tokens: int = 0  # KV tokens attention reads this step
    # Verification (steps with drafts): drafts per sampling request [N, K] padded with -1, and
    # the rows of the scored logits for each [N, K+1] (padding repeats the request's last row).
    draft_ids: torch.Tensor | None = None
    verify_rows: torch.Tensor | None = None
    # Per sampling request, positions the step in flight added beyond the host's count
    # (accepted drafts); seeded sampling keys its noise by the true position. None: all 0.
    sample_offsets: torch.Tensor | None = None
    # Some sequence computes prompt tokens (an admission, a chunk, a preempted recompute): the
    # step's time is not a decode step's, whichever kernel path ran it.
    has_prefill: bool = False


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: str, max_model_len: int) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        self.model, self.hf_config = build_model(model_path, self.device, self.dtype,
                                                 dummy=config.load_format == "dummy", seed=config.seed)
        self.arch = self.model.arch
        self.max_model_len = max_model_len
        self.model.cos_sin = ops.build_rope_cache(self.arch.head_dim, max_model_len, self.arch.rope_theta,
                                                  self.arch.rope_scaling, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.model_load_seconds = time.perf_counter() - t0
        self.block_size = config.block_size
        self.upload = PinnedUpload(self.device)
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.num_blocks = self._num_kv_blocks()
        a = self.arch
        self.kv_cache = torch.zeros(2, a.num_layers, self.num_blocks, self.block_size, a.num_kv_heads,
                                    a.head_dim, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.v_cache = self.kv_cache[1, i]
        c = config.cascade_attention
        self.cascade_min_rows = None  # None: cascade attention off
        if c is True:
            self.cascade_min_rows = 2
        elif c == "auto" and self.device.type == "cuda" \
                and self.arch.num_kv_heads * self.arch.head_dim >= CASCADE_MIN_KV_WIDTH:
            self.cascade_min_rows = CASCADE_MIN_ROWS
        self.cascade_steps = 0  # decode steps that ran cascade attention
        self.cascade_planner = CascadePlanner(self.block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_bufs: dict[str, torch.Tensor] = {}
        if self.device.type == "cuda" and not config.enforce_eager:
            self._capture_decode_graphs()
        # Most rows a step with prefill chunks may have to run as decode rows (0: never).
        self.max_prefill_rows_as_decode = max(self.graphs, default=0)
        kv_per_position = self.kv_bytes_per_block // self.block_size
        self.max_decode_row_reads = max(MAX_DECODE_ROW_READS, MAX_DECODE_ROW_READ_BYTES // kv_per_position)
        if self.device.type == "cuda":
            from kernels import step_inputs
            step_inputs.warm_up(self.device, config.num_speculative_tokens if config.speculative_method else 0)

    # ---- KV pool ---------------------------------------------------------
    @property
    def kv_bytes_per_block(self) -> int:
        a = self.arch
        return 2 * a.num_layers * self.block_size * a.num_kv_heads * a.head_dim * self.dtype.itemsize

    def _num_kv_blocks(self) -> int:
        if self.config.num_gpu_blocks_override:
            return int(self.config.num_gpu_blocks_override)
        if self.device.type != "cuda":
            return max(1, self.config.kv_cache_memory // self.kv_bytes_per_block)
        # Profile a worst-case prefill to learn the activation peak, then give the KV
        # pool what gpu_memory_utilization leaves.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._profile_run()
        peak = torch.cuda.max_memory_allocated()
        free, total = torch.cuda.mem_get_info()
        used_by_others = total - free - torch.cuda.memory_reserved()
        budget = total * self.config.gpu_memory_utilization - peak - max(0, used_by_others)
        n = int(budget // self.kv_bytes_per_block)
        if n < 1:
            raise RuntimeError("no GPU memory left for the KV cache; raise gpu_memory_utilization")
        return n

    def _profile_run(self) -> None:
        a = self.arch
        T = min(self.config.max_num_batched_tokens, self.max_model_len)
        nblk = -(-T // self.block_size)
        kc = torch.zeros(nblk, self.block_size, a.num_kv_heads, a.head_dim, dtype=self.dtype, device=self.device)
        for layer in self.model.layers:
            layer.self_attn.k_cache = kc
            layer.self_attn.v_cache = kc
        meta = AttentionMetadata(
            slot_mapping=torch.arange(T, device=self.device),
            block_tables=torch.arange(nblk, dtype=torch.int32, device=self.device).unsqueeze(0),
            context_lens=torch.tensor([T], dtype=torch.int32, device=self.device),
            cu_seqlens_q=torch.tensor([0, T], dtype=torch.int32, device=self.device),
            is_decode=False, max_q_len=T, max_context_len=T)
        with torch.inference_mode():
            h = self.model(torch.zeros(T, dtype=torch.long, device=self.device),
                           torch.arange(T, device=self.device), meta)
            self.model.compute_logits(h[-min(T, self.config.max_num_seqs):])
        torch.cuda.synchronize()
        del kc, h

    # ---- inputs ------------------------------------------------------------
    def prepare(self, batch: ScheduledBatch, prev, block_table: BlockTable) -> StepInputs:
        """Flat inputs for the batch. `prev` is the step still in flight (or None): a token it
        is still sampling (a placeholder on the host) is gathered from its `tokens` on the
        device, and where it verified drafts, the number it accepted (its `offsets`, known only
        on the device) shifts the request's positions, slots and context here, on the device.
        `block_table`: the block manager's, holding every request's block ids."""
        reqs, counts = batch.requests, batch.num_tokens
        B = len(reqs)
        starts = np.fromiter((r.num_computed_tokens for r in reqs), dtype=np.int64, count=B)
        lens = np.asarray(counts, dtype=np.int64)
        T = int(lens.sum())
        prev_offsets = prev.offsets if prev is not None else None
        plain = T == B and prev_offsets is None
        if plain:
            # Plain decode: one token per request, the last of its history. The common step of
            # a large batch, so built with comprehensions instead of the general loop below.
            ends = np.fromiter((len(r.prompt_token_ids) + len(r.output_token_ids) for r in reqs),
                               dtype=np.int64, count=B)
            plain = bool((ends == starts + 1).all())
        shifted: list[tuple[int, int, int, int]] = []  # (request, first token, tokens, offset row)
        if plain:
            ids = [(r.output_token_ids or r.prompt_token_ids)[-1] for r in reqs]
            g = np.fromiter((r.pending_row if r.num_pending else -1 for r in reqs), dtype=np.int64, count=B)
            gather_rows = g if (g >= 0).any() else None
            sample_rows, rows_per_req, logit_idx = list(range(B)), [1] * B, np.arange(B)
            drafts: list[list[int]] = [[]] * B
        else:
            ids, gathered = [], []  # gathered: (flat token, row of the step in flight) for placeholders
            sample_rows, rows_per_req, logit_idx, drafts = [], [], [], []
            cu = 0
            for i, (r, s, n) in enumerate(zip(reqs, starts.tolist(), counts)):
                ntok = r.num_tokens
                if s + n <= len(r.prompt_token_ids):
                    ids.extend(r.prompt_token_ids[s:s + n])
                elif n == 1 and not r.spec_token_ids:
                    ids.append(r.output_token_ids[-1])  # plain decode
                else:
                    ids.extend(r.token_slice(s, s + n))
                if r.num_pending and s <= ntok - 1 < s + n:  # the newest token is still on the device
                    gathered.append((cu + ntok - 1 - s, r.pending_row))
                    if prev_offsets is not None:
                        shifted.append((i, cu, n, r.pending_row))
                end = s + n
                if end >= ntok:  # reached the real tokens' end: this request samples
                    k = end - ntok  # drafts scored this step
                    sample_rows.append(i)
                    rows_per_req.append(k + 1)
                    logit_idx.extend(range(cu + n - k - 1, cu + n))
                    drafts.append(r.spec_token_ids[:k])
                cu += n
            gather_rows = None
            if gathered:
                gather_rows = np.full(T, -1, dtype=np.int64)
                at, src = zip(*gathered)
                gather_rows[list(at)] = src
        table = block_table.gather(reqs, max(len(r.block_ids) for r in reqs))
        max_blocks = table.shape[1]
        hit = np.fromiter((r.num_hit_tokens for r in reqs), dtype=np.int64, count=B)
        cu_q = np.zeros(B + 1, dtype=np.int32)
        np.cumsum(lens, out=cu_q[1:])
        # Flat per-token positions and slots, without a Python loop over tokens.
        row = np.repeat(np.arange(B), lens)
        pos = np.repeat(starts, lens) + (np.arange(T) - np.repeat(cu_q[:-1], lens))
        slots = table[row, pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size
        slots[pos < hit[row]] = -1  # already in a cached block: keep that KV
        dev = self.device
        ctx = starts + lens
        B_rows, q_max = B, int(lens.max())
        as_decode = 1 < q_max <= MAX_ROWS_AS_DECODE or (
            q_max > 1 and T <= self.max_prefill_rows_as_decode and int(pos.sum()) + T <= self.max_decode_row_reads)
        if as_decode:
            # Few new tokens per sequence (speculative verification): give every token a row of
            # its own, with its sequence's block table and a context ending at its own position.
            # Causality then comes from the context lengths, the whole step is a decode step
            # (decode kernel, CUDA graph), and the KV of earlier tokens of the same sequence is
            # already written, since each layer stores K/V before it attends.
            table = table[row]
            ctx = pos + 1
            cu_q = np.arange(T + 1, dtype=np.int32)
            lens = np.ones(T, dtype=np.int64)
            B_rows = T
        is_decode = bool((lens == 1).all())
        plan = None
        # Verification rows (q_max > 1) already read their sequence's blocks k+1 times from
        # the L2 cache; cascade there is unmeasured, so it stays on plain decode steps. Its plan
        # is made from host-side context lengths, so not where the device shifts them.
        if q_max == 1 and not shifted and self.cascade_min_rows is not None and B_rows >= self.cascade_min_rows:
            plan = self.cascade_planner.plan(reqs, table, ctx)
        # What the step in flight patches in (one kernel, `ops.patch_step_inputs`): per flat
        # token, the row to take its input id from and the row whose accepted drafts shift it
        # (with its block-table row, to recompute its slot); per attention row and per sampling
        # request, the row that shifts its context or sampling position.
        patch = []
        if gather_rows is not None:
            patch.append(gather_rows)
            if shifted:
                sh = np.full(T, -1, dtype=np.int64)
                csh = np.full(B_rows, -1, dtype=np.int64)
                for i, c0, n, src in shifted:
                    sh[c0:c0 + n] = src
                    if as_decode:
                        csh[c0:c0 + n] = src
                    else:
                        csh[i] = src
                ssh = np.asarray([reqs[i].pending_row if reqs[i].num_pending else -1 for i in sample_rows],
                                 dtype=np.int64)
                patch += [sh, np.arange(T) if as_decode else row, csh, ssh]
        # Verification: drafts per sampling request, and the scored rows of each ([N, K+1],
        # padded with the request's last row).
        K = max(rows_per_req, default=1) - 1
        ver = []
        if K:
            N = len(drafts)
            d = np.full((N, K), -1, dtype=np.int64)
            vidx = np.zeros((N, K + 1), dtype=np.int64)
            r0 = 0
            for j, (dj, nr) in enumerate(zip(drafts, rows_per_req)):
                d[j, :len(dj)] = dj
                vidx[j] = r0 + np.minimum(np.arange(K + 1), nr - 1)
                r0 += nr
            ver = [d.ravel(), vidx.ravel()]
        # One host-to-device copy for everything; the pieces are views of it.
        parts = [np.asarray(ids, dtype=np.int64), pos, slots, ctx, cu_q, np.asarray(logit_idx, dtype=np.int64),
                 table.ravel(), *patch, *ver]
        n_fixed = len(parts)
        if plan is not None:
            parts += [plan.prefix_tables.ravel(), plan.prefix_lens, plan.group_cu, plan.order,
                      plan.suffix_tables.ravel(), plan.suffix_lens]
        # Every piece starts 16-byte aligned (an even number of int64s in): Triton specialises
        # kernels on pointer alignment, and a piece whose alignment changed from step to step
        # would compile a new variant in the middle of a job.
        sizes = [len(p) for p in parts]
        padded = [n + (n & 1) for n in sizes]
        total = sum(padded)
        buf = self.upload.stage(total)
        at, starts_at = 0, []
        for p_, n, m in zip(parts, sizes, padded):
            buf[at:at + n] = p_
            starts_at.append(at)
            at += m
        flat = self.upload.send(total)
        pieces = [flat[a:a + n] for a, n in zip(starts_at, sizes)]  # (slicing beats torch.split here)
        input_ids, pos_t, slots_t, ctx_t, cu_t, logit_t, table_t = pieces[:7]
        pieces = pieces[7:]
        sample_offsets = None
        if patch:
            p_t = pieces[:len(patch)]
            pieces = pieces[len(patch):]
            if shifted:
                sample_offsets = torch.empty(len(sample_rows), dtype=torch.int64, device=dev)
            ops.patch_step_inputs(input_ids, pos_t, slots_t, ctx_t, sample_offsets, table_t.view(B_rows, max_blocks),
                                  self.block_size, prev.tokens, prev_offsets if shifted else None, *p_t)
        draft_t = vidx_t = None
        if K:
            draft_t = pieces[0].view(-1, K)
            vidx_t = pieces[1].view(-1, K + 1)
        cascade = None
        if plan is not None:
            # The plan's pieces sit at the end of the copy: one int32 conversion for all six.
            base = starts_at[n_fixed]
            tail = flat[base:].to(torch.int32)
            pt, pl, gcu, order, st, sl = (tail[a - base:a - base + n] for a, n in zip(starts_at[n_fixed:], sizes[n_fixed:]))
            cascade = CascadeMetadata(pt.view(plan.prefix_tables.shape), pl, gcu, order,
                                      st.view(plan.suffix_tables.shape), sl)
            self.cascade_steps += 1
        # The host's context lengths miss the shifts; the bound for grid sizing must not.
        max_shift = max((reqs[i].num_unverified for i, *_ in shifted), default=0)
        meta = AttentionMetadata(
            slot_mapping=slots_t, block_tables=table_t.view(B_rows, max_blocks).to(torch.int32),
            context_lens=ctx_t.to(torch.int32), cu_seqlens_q=cu_t.to(torch.int32),
            is_decode=is_decode, max_q_len=int(lens.max()), max_context_len=int(ctx.max()) + max_shift,
            cascade=cascade)
        has_prefill = not plain and any(s < r.num_prompt_tokens for r, s in zip(reqs, starts.tolist()))
        return StepInputs(input_ids, pos_t, meta, logit_t, sample_rows, rows_per_req, int(ctx.sum()),
                          draft_ids=draft_t, verify_rows=vidx_t, sample_offsets=sample_offsets,
                          has_prefill=has_prefill)

    # ---- forward -------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, inp: StepInputs) -> torch.Tensor:
        """Logits [num scored rows, vocab] for the rows in inp.logits_indices."""
        B = inp.meta.block_tables.shape[0]
        if inp.meta.is_decode and inp.meta.cascade is not None and self.cascade_graphs \
                and B <= max(self.cascade_graphs):
            return self._replay_cascade(inp)
        if inp.meta.is_decode and self.graphs and B <= max(self.graphs):
            return self._replay(inp)
        h = self.model(inp.input_ids, inp.positions, inp.meta)
        return self.model.compute_logits(h[inp.logits_indices])

    def _graph_sizes(self) -> list[int]:
        c = self.config
        return decode_graph_sizes(c.max_num_seqs, c.num_speculative_tokens if c.speculative_method else 0)

    def _capture_decode_graphs(self) -> None:
        sizes = self._graph_sizes()
        maxB, mb, dev = sizes[-1], self.max_blocks_per_seq, self.device
        g = self.graph_bufs = {
            "input_ids": torch.zeros(maxB, dtype=torch.long, device=dev),
            "positions": torch.zeros(maxB, dtype=torch.long, device=dev),
            "slot_mapping": torch.full((maxB,), -1, dtype=torch.long, device=dev),
            "block_tables": torch.zeros(maxB, mb, dtype=torch.int32, device=dev),
            "context_lens": torch.ones(maxB, dtype=torch.int32, device=dev),
            "cu_seqlens_q": torch.arange(maxB + 1, dtype=torch.int32, device=dev),
        }
        pool = None
        for B in reversed(sizes):
            meta = AttentionMetadata(g["slot_mapping"][:B], g["block_tables"][:B], g["context_lens"][:B],
                                     g["cu_seqlens_q"][:B + 1], True, 1, self.max_model_len)
            self.graphs[B], g[f"hidden_{B}"], pool = self._capture(B, meta, pool)
        if self.cascade_min_rows is not None:
            self._capture_cascade_graphs([s for s in sizes if s >= self.cascade_min_rows], pool)
        torch.cuda.synchronize()

    def _capture_cascade_graphs(self, sizes: list[int], pool) -> None:
        """Decode graphs whose attention reads shared prefixes once per group. The plan's
        layout is fixed (MAX_GROUPS groups and a no-prefix group), so one graph per size
        serves every plan; rows past the batch go to the no-prefix group."""
        if not sizes:
            return
        maxB, mb, dev, g = sizes[-1], self.max_blocks_per_seq, self.device, self.graph_bufs
        G = MAX_GROUPS + 1
        g.update({
            "c_prefix_tables": torch.zeros(G, mb, dtype=torch.int32, device=dev),
            "c_prefix_lens": torch.zeros(G, dtype=torch.int32, device=dev),
            "c_group_cu": torch.zeros(G + 1, dtype=torch.int32, device=dev),
            "c_order": torch.arange(maxB, dtype=torch.int32, device=dev),
            "c_rows": torch.arange(maxB, dtype=torch.int32, device=dev),
            "c_suffix_tables": torch.zeros(maxB, mb, dtype=torch.int32, device=dev),
            "c_suffix_lens": torch.ones(maxB, dtype=torch.int32, device=dev),
        })
        for B in reversed(sizes):
            g["c_group_cu"][-1] = B  # everything in the no-prefix group while capturing
            cm = CascadeMetadata(g["c_prefix_tables"], g["c_prefix_lens"], g["c_group_cu"], g["c_order"][:B],
                                 g["c_suffix_tables"][:B], g["c_suffix_lens"][:B])
            meta = AttentionMetadata(g["slot_mapping"][:B], g["block_tables"][:B], g["context_lens"][:B],
                                     g["cu_seqlens_q"][:B + 1], True, 1, self.max_model_len, cascade=cm)
            self.cascade_graphs[B], g[f"chidden_{B}"], pool = self._capture(B, meta, pool)

    def _capture(self, B: int, meta: AttentionMetadata, pool):
        """(graph, its hidden-state buffer, the memory pool to share) for a decode step of B rows.
        The graph stops before the LM head: every graph keeps its output buffer, and [B, vocab]
        logits per size would hold gigabytes across 36 sizes (fp32, 49k vocabulary) where hidden
        states hold megabytes; the head runs after the replay, one matmul over the scored rows."""
        g = self.graph_bufs
        # Warm up (Triton compiles) outside the capture.
        with torch.inference_mode():
            self.model(g["input_ids"][:B], g["positions"][:B], meta)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=pool):
            out = self.model(g["input_ids"][:B], g["positions"][:B], meta)
        return graph, out, graph.pool()

    def _replay(self, inp: StepInputs) -> torch.Tensor:
        B = inp.meta.block_tables.shape[0]
        size = next(s for s in sorted(self.graphs) if s >= B)
        g, m = self.graph_bufs, inp.meta
        g["input_ids"][:B].copy_(inp.input_ids, non_blocking=True)
        g["positions"][:B].copy_(inp.positions, non_blocking=True)
        g["slot_mapping"][:B].copy_(m.slot_mapping, non_blocking=True)
        g["slot_mapping"][B:size].fill_(-1)
        g["context_lens"][:B].copy_(m.context_lens, non_blocking=True)
        g["context_lens"][B:size].fill_(1)
        nb = m.block_tables.shape[1]
        g["block_tables"][:B, :nb].copy_(m.block_tables, non_blocking=True)
        self.graphs[size].replay()
        return self.model.compute_logits(g[f"hidden_{size}"][:B][inp.logits_indices])

    def _replay_cascade(self, inp: StepInputs) -> torch.Tensor:
        B = inp.meta.block_tables.shape[0]
        size = next(s for s in sorted(self.cascade_graphs) if s >= B)
        g, m, c = self.graph_bufs, inp.meta, inp.meta.cascade
        g["input_ids"][:B].copy_(inp.input_ids, non_blocking=True)
        g["positions"][:B].copy_(inp.positions, non_blocking=True)
        g["slot_mapping"][:B].copy_(m.slot_mapping, non_blocking=True)
        g["slot_mapping"][B:size].fill_(-1)
        nb = c.prefix_block_tables.shape[1]
        g["c_prefix_tables"][:, :nb].copy_(c.prefix_block_tables, non_blocking=True)
        g["c_prefix_lens"].copy_(c.prefix_lens, non_blocking=True)
        g["c_group_cu"].copy_(c.group_cu, non_blocking=True)
        g["c_group_cu"][-1:].fill_(size)  # padding rows join the no-prefix group
        g["c_order"][:B].copy_(c.order, non_blocking=True)
        g["c_order"][B:size].copy_(g["c_rows"][B:size], non_blocking=True)
        g["c_suffix_tables"][:B, :nb].copy_(c.suffix_block_tables, non_blocking=True)
        g["c_suffix_lens"][:B].copy_(c.suffix_lens, non_blocking=True)
        g["c_suffix_lens"][B:size].fill_(1)
        self.cascade_graphs[size].replay()
        return self.model.compute_logits(g[f"chidden_{size}"][:B][inp.logits_indices])


def decode_graph_sizes(max_num_seqs: int, num_speculative_tokens: int = 0) -> list[int]:
    """Row counts to capture decode graphs for. Verification gives every scored token a row of
    its own (up to MAX_ROWS_AS_DECODE per request), so with speculation the graphs cover
    max_num_seqs times that, up to 512 rows: past the largest graph a step runs eagerly, about
    10 ms of launches on SmolLM2 (measured on the H100: batch 8 drafting 4 tokens each, 40 rows,
    took 14 ms a step with graphs up to 32 rows, against about 4 ms through a graph). Admissions
    while others decode run their prefill chunks as decode rows too, so the graphs cover at least
    ADMISSION_GRAPH_ROWS whenever two requests can run at once."""
    rows = 1 + min(num_speculative_tokens, MAX_ROWS_AS_DECODE - 1)
    top = min(max_num_seqs * rows, 512)
    if max_num_seqs > 1:
        top = max(top, ADMISSION_GRAPH_ROWS)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    return sizes if sizes[-1] == top else sizes + [top]
