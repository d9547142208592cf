"""LocalEngine: an embedded continuous-batching engine on a ``transformers`` causal LM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ContextLengthExceeded, EngineError
from .base import (
    CompletionOutput,
    GenerateRequest,
    GenerateResult,
    InferenceEngine,
    OnTokens,
    TokenDelta,
    WeightUpdate,
)
from .local_adapters import LocalAdapterServing
from .local_weights import apply_weight_update
from .lora import LoRAAdapters
from .prefix_cache import CachedPrefix, PrefillCounts, PrefixCache
from .sampling import sample
from .scheduler import RunningBatch, prefill, prefill_cached
from .shared_head import prefill_shared_heads

log = logging.getLogger(__name__)

# joining prompts are prefilled together while (rows x longest prompt) stays within this
PREFILL_TOKEN_BUDGET = 8192
MAX_STEPS_PER_HOP = 64  # decode steps one worker-thread hop may run (see LocalEngine._steps)
TAIL_TEXTS = 65_536  # decoded stop-string windows remembered (_hit_stop_string); then forgotten


@dataclass
class _Seq:
    """One completion being decoded (a row of the running batch)."""

    job: _Job
    generator: random.Random | None  # the row's stream (engines/sampling.py: draw)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    parked_kv: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # while paused
    index: int = 0  # which of the request's n completions
    published: int = 0  # tokens already handed to the job's on_tokens

    @property
    def adapter(self) -> str | None:
        return self.job.request.adapter


@dataclass
class _Job:
    """A request waiting or running, with the future its caller awaits."""

    request: GenerateRequest
    future: asyncio.Future
    seqs: list[_Seq] = field(default_factory=list)
    on_tokens: OnTokens | None = None  # generate_streaming's receiver


@dataclass
class _Hit:
    """A joining job whose prompt's first ``reuse`` tokens are cached in ``entry``."""

    job: _Job
    reuse: int
    entry: CachedPrefix

    @property
    def prompt(self) -> list[int]:
        return self.job.request.prompt_ids

    @property
    def suffix(self) -> int:
        """Prompt tokens after the reusable prefix."""
        return len(self.prompt) - self.reuse


class LocalEngine(LocalAdapterServing, InferenceEngine):
    """An in-process inference engine with continuous batching and a KV cache.

    A background task (started on the first ``generate``) runs decode steps of the running
    batch in a worker thread; queued requests are prefilled and join the batch between any two
    steps, finished completions leave it after every step.

    Log-probs: ``CompletionOutput.logprobs[i]`` is the log-prob of ``token_ids[i]`` under the
    distribution it was sampled from, i.e. after temperature, top-k and top-p filtering
    (renormalised); greedy requests (temperature 0) report the temperature-1 log-prob of the
    argmax. ``top_logprobs`` come from that same distribution. ``versions[i]`` is the weight
    version whose forward pass produced token i (a completion that spans ``update_weights``
    records both versions; its earlier KV cache is kept).

    Prefix caching: when a completion of a session (``GenerateRequest.session_id``) finishes,
    its keys/values are kept, and the session's next request computes only the part of its
    prompt after the longest common prefix (``areal_agents.engines.prefix_cache``; dropped on
    every weight update). ``prefill_counts`` counts prompt tokens computed and reused. Outputs
    with and without it agree up to float32 rounding of the reused keys/values.

    Shared prefills: requests with identical prompt ids (and adapter) that join the batch in
    the same step are prefilled once; every request's rows start from copies of those
    keys/values (a GRPO group's members send one prompt as separate requests). Each request
    keeps its own sampling parameters and seed, so outputs equal those it gets alone
    (``prefill_counts.shared`` counts the prompt tokens not recomputed).

    LoRA adapters: ``add_adapter(name, ...)`` serves a LoRA adapter of the base model, and
    requests naming it (``GenerateRequest.adapter``) decode in the same batch as every other
    (``areal_agents.engines.lora``). Each adapter has its own version (``adapter_version``);
    ``update_weights`` with ``WeightUpdate.adapter`` loads only that adapter's tensors and
    bumps only its version, and ``pause(adapter=name)`` parks only that adapter's rows (their
    keys/values kept; on ``resume`` they rejoin after one fed token), so other adapters and
    the base keep decoding. ``add_adapter`` returns a per-adapter ``InferenceEngine`` view
    (``areal_agents.engines.local_adapters``) for routers and trainers.

    Args:
        model_or_path: a ``PreTrainedModel``, a checkpoint directory or a spec like "tiny:s".
        tokenizer: needed with a model object (EOS id and stop-string decoding).
        device: "cpu", "cuda", "cuda:1", ...
        max_batch_size: completions decoded together at most (``n`` samples count each).
        max_queue: requests waiting for a slot at most; further ``generate`` calls wait
            (back-pressure) until one frees, they do not fail.
        max_context: context window (default: ``config.max_position_embeddings``).
        prefix_cache_tokens: tokens the prefix cache holds over all sessions (0 disables it).
        shared_head_tokens: distinct prompts joining in the same step whose first
            ``shared_head_tokens`` tokens agree prefill their longest common prefix once
            (``areal_agents.engines.shared_head``; ``prefill_counts.head``); 0 (default) turns
            it off. Changes float rounding only (log-probs ~1e-7), not bit-identical to off.
        dtype: parameter dtype (default: keep the model's). With float32 parameters
            ``exact_logprobs`` is True (the trainer may then skip the proximal recompute).

    Example:
        >>> import asyncio
        >>> from areal_agents.engines import GenerateRequest, SamplingParams
        >>> async def main():
        ...     async with LocalEngine("tiny") as engine:
        ...         req = GenerateRequest([1, 20, 30], SamplingParams(max_tokens=4, temperature=0))
        ...         return (await engine.generate(req)).outputs[0]
        >>> len(asyncio.run(main()).token_ids) <= 4
        True
    """

    def __init__(self, model_or_path: Any, tokenizer: Any = None, *, device: str = "cpu",
                 max_batch_size: int = 32, max_queue: int = 1024, max_context: int | None = None,
                 dtype: torch.dtype | None = None, prefix_cache_tokens: int = 16384,
                 shared_head_tokens: int = 0) -> None:
        if isinstance(model_or_path, (str, Path)):
            from ..models import load

            model, loaded_tokenizer = load(model_or_path)
            tokenizer = tokenizer or loaded_tokenizer
        else:
            model = model_or_path
        if tokenizer is None:
            raise ValueError("LocalEngine(model) needs tokenizer= (for EOS and stop strings); "
                             "or pass a checkpoint path / 'tiny' spec instead of a model object")
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        if shared_head_tokens < 0:
            raise ValueError(f"shared_head_tokens must be >= 0 (0 turns head sharing off), got "
                             f"{shared_head_tokens}")
        self.shared_head_tokens = shared_head_tokens
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=dtype).eval()
        # float32 weights: log-probs equal a float32 train engine's up to rounding
        self.exact_logprobs = all(p.dtype == torch.float32 for p in self.model.parameters()
                                  if p.is_floating_point())
        self.tokenizer = tokenizer
        # decoded stop-string windows (_hit_stop_string) of this tokenizer; replacing or changing
        # the tokenizer after serving needs .clear()
        self._tail_texts: dict[tuple[int, ...], str] = {}
        self.max_context = max_context or int(getattr(model.config, "max_position_embeddings", 2048))
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.version = 0
        self.eos_token_id = tokenizer.eos_token_id
        from ..models.loading import eos_token_ids

        # every id the checkpoint's generation_config ends on (Qwen3: <|im_end|>, <|endoftext|>)
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self._vocab_size = int(model.config.vocab_size)
        text_config = model.config.get_text_config(decoder=True)
        if getattr(text_config, "use_sliding_window", False) or "sliding_attention" in (
                getattr(text_config, "layer_types", None) or []):
            raise ValueError("LocalEngine supports full-attention models only; this config uses "
                             "sliding-window attention (set use_sliding_window=False or use vLLM)")
        self._waiting: deque[_Job] = deque()
        self._running: list[_Seq] = []
        self._batch = RunningBatch(self.max_batch_size)
        self._prefix_cache = PrefixCache(prefix_cache_tokens)
        self.prefill_counts = PrefillCounts()
        self._paused = False
        self._lora: LoRAAdapters | None = None
        self._adapter_versions: dict[str, int] = {}
        self._paused_adapters: set[str] = set()
        self._parked: list[_Seq] = []
        self._closed = False
        self.hops = 0  # worker-thread hops of the scheduler (each runs one or more steps)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._step_lock: asyncio.Lock | None = None
        self._lock_wanted = 0  # callers waiting to act between two steps (see _between_steps)

    # -- public API ---------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Generate ``request.sampling.n`` completions of ``request.prompt_ids``.

        Raises:
            ContextLengthExceeded: ``len(prompt_ids) + max_tokens > max_context``.
            EngineError: empty prompt, ids outside the vocabulary, engine closed, or a failed
                forward pass (the message names the cause).
        """
        return await self._submit(request, None)

    async def generate_streaming(self, request: GenerateRequest,
                                 on_tokens: OnTokens) -> GenerateResult:
        """``generate``, handing each decode step's new tokens to ``on_tokens`` (on the event
        loop) as the step ends: rows of a streaming request run one decode step per worker
        hop (see ``_steps``), so tokens leave as they are produced. Raises as ``generate``; an
        exception from ``on_tokens`` fails this request only."""
        return await self._submit(request, on_tokens)

    async def _submit(self, request: GenerateRequest, on_tokens: OnTokens | None
                      ) -> GenerateResult:
        self._check(request)
        self._ensure_started()
        assert self._slots is not None and self._wake is not None
        async with self._slots:
            if self._closed:
                raise EngineError("LocalEngine is closed; create a new engine")
            job = _Job(request, self._loop.create_future(), on_tokens=on_tokens)
            self._waiting.append(job)
            self._wake.set()
            return await job.future

    async def pause(self, adapter: str | None = None) -> None:
        """Stop decoding after the current step; in-flight requests wait. Idempotent.

        Args:
            adapter: pause only this LoRA adapter's requests (the others keep decoding).
        """
        if adapter is None:
            self._paused = True
        else:
            self._adapter_spec(adapter)
            self._paused_adapters.add(adapter)
        if self._step_lock is not None:
            async with self._between_steps():  # the step in progress (if any) has ended
                pass

    async def resume(self, adapter: str | None = None) -> None:
        """Continue decoding (``adapter``: that adapter's requests only). Idempotent."""
        if adapter is None:
            self._paused = False
        else:
            self._paused_adapters.discard(adapter)
        if self._wake is not None:
            self._wake.set()

    async def update_weights(self, update: WeightUpdate) -> None:
        """Load HF-named tensors or a safetensors directory between two decode steps.

        With ``update.adapter``, the tensors are that adapter's (PEFT names) and only its
        version changes.

        Raises:
            KeyError: a tensor name the model (or the adapter) does not have.
            ValueError: a shape mismatch.
        """
        if update.adapter is not None:
            await self._update_adapter(update)
            return
        lock = self._step_lock
        if lock is None:
            apply_weight_update(self.model, update)
        else:
            async with self._between_steps():
                await asyncio.to_thread(apply_weight_update, self.model, update)
        # no await since the lock was released: no step runs before the cache is dropped
        self.version = update.version if update.version is not None else self.version + 1
        self._prefix_cache.clear()

    @property
    def num_pending(self) -> int:
        return len(self._waiting) + len({id(s.job) for s in self._running + self._parked})

    async def close(self) -> None:
        """Stop the background task and fail queued/running requests. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._fail_all(EngineError("LocalEngine was closed while the request was pending"))

    # -- internals ----------------------------------------------------------------------------

    def _check(self, request: GenerateRequest) -> None:
        if self._closed:
            raise EngineError("LocalEngine is closed; create a new engine")
        ids, sp = request.prompt_ids, request.sampling
        if request.adapter is not None:
            self._adapter_spec(request.adapter)
        if not ids:
            raise EngineError("empty prompt: prompt_ids must hold at least one token id")
        if min(ids) < 0 or max(ids) >= self._vocab_size:
            raise EngineError(f"prompt_ids outside the vocabulary [0, {self._vocab_size}): "
                              f"min {min(ids)}, max {max(ids)}; was it tokenized for this model?")
        if len(ids) + sp.max_tokens > self.max_context:
            raise ContextLengthExceeded(
                f"prompt of {len(ids)} tokens + max_tokens {sp.max_tokens} = "
                f"{len(ids) + sp.max_tokens} exceeds the context window of {self.max_context} "
                "tokens; shorten the prompt or lower max_tokens"
            )

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and self._loop is loop and not self._task.done():
            return
        if self._loop is not None and self._loop is not loop and (self._waiting or self._running):
            raise EngineError("LocalEngine is busy on another event loop; use one loop per engine")
        if self._task is not None and self._task.done() and self._loop is loop:
            # the scheduler died (a bug or a cancelled task): fail what it held, then restart
            self._fail_all(EngineError("LocalEngine's scheduler stopped; the request was dropped"))
        self._loop = loop
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self.max_queue + self.max_batch_size)
        self._step_lock = asyncio.Lock()
        self._waiting.clear()
        self._running, self._batch = [], RunningBatch(self.max_batch_size)
        self._task = loop.create_task(self._run(), name="LocalEngine.loop")

    async def _run(self) -> None:
        assert self._wake is not None and self._step_lock is not None
        while True:
            if self._paused or not self._has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            for seq in self._running:  # callers that gave up (cancelled) free their rows
                if seq.job.future.done() and seq.finish_reason is None:
                    seq.finish_reason = "abort"
            joining = self._admit()
            async with self._step_lock:
                held = [j for j in joining if self._paused or j.request.adapter
                        in self._paused_adapters]
                if held:
                    self._waiting.extendleft(reversed(held))
                    joining = [j for j in joining if j not in held]
                if self._paused:
                    continue
                try:
                    finished = await asyncio.to_thread(self._steps, joining, self.version)
                except Exception as exc:  # a failed forward fails the batch, not the engine
                    jobs = {id(j): j for j in joining} | {
                        id(s.job): s.job for s in self._running + self._parked}
                    self._running, self._batch, self._parked = [], RunningBatch(self.max_batch_size), []
                    for job in jobs.values():
                        if not job.future.done():
                            job.future.set_exception(EngineError(f"generation failed: {exc!r}"))
                    continue
                self._publish(finished)
            for job in finished:
                if not job.future.done():
                    job.future.set_result(self._result(job))

    def _has_work(self) -> bool:
        """Anything a step would do: running rows (to decode or park), admissible waiting
        jobs, parked rows whose adapter was resumed."""
        paused = self._paused_adapters
        return bool(self._running
                    or any(j.request.adapter not in paused for j in self._waiting)
                    or any(s.adapter not in paused for s in self._parked))

    def _admit(self) -> list[_Job]:
        """Pop waiting jobs that fit the batch (at least one when the batch is empty); jobs of
        a paused adapter stay queued, in order."""
        joining: list[_Job] = []
        skipped: list[_Job] = []
        rows = len(self._running) + len(self._parked)
        while self._waiting:
            if self._waiting[0].request.adapter in self._paused_adapters:
                skipped.append(self._waiting.popleft())
                continue
            n = self._waiting[0].request.sampling.n
            if rows and rows + n > self.max_batch_size:
                break
            job = self._waiting.popleft()
            if job.future.done():  # cancelled by its caller
                continue
            joining.append(job)
            rows += n
        self._waiting.extendleft(reversed(skipped))
        return joining

    @contextlib.asynccontextmanager
    async def _between_steps(self) -> Any:
        """Hold the step lock (between two decode steps); the worker thread ends its run of
        steps (``_steps``) after the current one while anyone waits here."""
        assert self._step_lock is not None
        self._lock_wanted += 1
        try:
            await self._step_lock.acquire()
        finally:
            self._lock_wanted -= 1
        try:
            yield
        finally:
            self._step_lock.release()

    def _steps(self, joining: list[_Job], version: int) -> list[_Job]:
        """``_step``, then more decode steps in the same worker-thread hop while nothing
        would change what the event loop does between them: no row finished, no waiting
        job that could join, no pause, no caller waiting for the step lock, no caller gone, at most
        ``MAX_STEPS_PER_HOP``. Each step is exactly the ``_step`` the loop would run next (the
        same rows, version and generators), so tokens and log-probs are unchanged; the event
        loop is woken once per hop instead of once per token. A waiting job ends the hop only
        when a row is free (``_could_admit``): with every row taken the loop would admit
        nothing and run the same next step. A streaming request's rows
        (``generate_streaming``) end the hop after each step, so its tokens leave per step."""
        finished = self._step(joining, version)
        for _ in range(MAX_STEPS_PER_HOP - 1):
            if (finished or not self._running or self._could_admit() or self._parked
                    or self._paused or self._paused_adapters or self._lock_wanted
                    or self._closed or any(s.job.future.done() or s.job.on_tokens
                                           for s in self._running)):
                break
            finished = self._step([], version)
        self.hops += 1
        return finished

    def _could_admit(self) -> bool:
        """Whether ``_admit`` might take a waiting job now: one is waiting and the batch has a
        free row. With every row taken (parked rows count) it admits nothing, whatever waits."""
        return bool(self._waiting) and (len(self._running) + len(self._parked)
                                        < self.max_batch_size)

    def _step(self, joining: list[_Job], version: int) -> list[_Job]:
        """Prefill ``joining``, then decode one token for every row (runs in a worker thread)."""
        for job in joining:
            sp = job.request.sampling
            seed = sp.seed if sp.seed is not None else random.getrandbits(62)
            for i in range(sp.n):
                gen = None
                if sp.temperature > 0:
                    gen = random.Random((seed * 1_000_003 + i) % 2**63)
                job.seqs.append(_Seq(job, gen, index=i))
        self._park()
        finished = self._unpark()
        hit_groups, misses = self._plan_cached_prefills(joining, version)
        for hits in hit_groups:
            with self._rows([hit.job.request.adapter for hit in hits]):
                prefilled = self._prefill_hits(hits)
            self._join([seq for hit in hits for seq in hit.job.seqs], prefilled)
        if self.shared_head_tokens and len(misses) > 1:  # distinct prompts with a common head
            distinct = _same_prompts(misses)
            joined = prefill_shared_heads(
                self.model, self.device, [[job.request for job in jobs] for jobs in distinct],
                self.shared_head_tokens, PREFILL_TOKEN_BUDGET, self.prefill_counts, self._rows,
                lambda groups, prefilled: self._join(
                    [seq for i in groups for job in distinct[i] for seq in job.seqs], prefilled))
            done = {id(job) for i in joined for job in distinct[i]}
            misses = [job for job in misses if id(job) not in done]
        for group in _prefill_groups(_same_prompts(misses), PREFILL_TOKEN_BUDGET):
            firsts = [same[0].request for same in group]
            self.prefill_counts.computed += sum(len(request.prompt_ids) for request in firsts)
            self.prefill_counts.shared += sum(len(job.request.prompt_ids)
                                              for same in group for job in same[1:])
            with self._rows([request.adapter for request in firsts]):
                prefilled = prefill(self.model, [request.prompt_ids for request in firsts],
                                    [sum(job.request.sampling.n for job in same) for same in group],
                                    self.device)
            self._join([seq for same in group for job in same for seq in job.seqs], prefilled)
        finished += self._drop_finished()  # aborted rows; max_tokens=1 or EOS first
        if self._running:
            with self._rows([s.adapter for s in self._running]):
                logits = self._batch.decode(self.model, [s.token_ids[-1] for s in self._running])
            self._append_tokens(self._running, logits)
            finished += self._drop_finished()
        return finished

    def _plan_cached_prefills(self, joining: list[_Job],
                              version: int) -> tuple[list[list[_Hit]], list[_Job]]:
        """Split ``joining`` into groups prefilled after their cached prefixes and jobs
        prefilled from scratch (no usable cache entry).

        Every row of a group computes as many tokens as the group's longest uncached suffix (a
        shorter one recomputes a few cached tokens), so groups gather suffixes of similar
        length: the longest at most twice the shortest plus 16, within the prefill budget. A
        prompt shorter than its group's longest suffix is prefilled from scratch.
        """
        hits, misses = [], []
        for job in joining:
            prompt = job.request.prompt_ids
            reuse, entry = self._prefix_cache.get(_cache_key(job.request), prompt,
                                                  self._version_of(job.request.adapter))
            if entry is None:
                misses.append(job)
            else:
                hits.append(_Hit(job, reuse, entry))
        groups: list[list[_Hit]] = []
        for hit in sorted(hits, key=lambda h: h.suffix):  # stable: ties keep arrival order
            group = groups[-1] if groups else []
            longest = max([len(h.prompt) for h in group] + [len(hit.prompt)])
            if (group and hit.suffix <= 2 * group[0].suffix + 16
                    and longest * (len(group) + 1) <= PREFILL_TOKEN_BUDGET):
                group.append(hit)
            else:
                groups.append([hit])
        planned = []
        for group in groups:
            width = group[-1].suffix
            misses += [h.job for h in group if len(h.prompt) < width]
            planned.append([h for h in group if len(h.prompt) >= width])
        return planned, misses

    def _prefill_hits(self, hits: list[_Hit]) -> tuple:
        """Prefill a group of ``_plan_cached_prefills`` in one batch (``prefill_cached``)."""
        width = max(hit.suffix for hit in hits)
        prefixes, suffixes = [], []
        for hit in hits:
            reuse = len(hit.prompt) - width  # in [0, hit.reuse]: see _plan_cached_prefills
            prefixes.append(([k[..., :reuse, :] for k in hit.entry.keys],
                             [v[..., :reuse, :] for v in hit.entry.values]))
            suffixes.append(list(hit.prompt[reuse:]))
            self.prefill_counts.reused += reuse
            self.prefill_counts.computed += len(hit.prompt) - reuse
        return prefill_cached(self.model, prefixes, suffixes,
                              [hit.job.request.sampling.n for hit in hits], self.device)

    def _join(self, seqs: list[_Seq], prefilled: tuple) -> None:
        """Sample the first token of prefilled ``seqs`` and add their rows to the batch;
        ``prefilled`` is ``prefill``'s (cache, mask, positions, logits)."""
        cache, mask, positions, logits = prefilled
        self._append_tokens(seqs, logits)
        self._batch.add(cache, mask, positions)
        self._running.extend(seqs)

    def _append_tokens(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        sps = [s.job.request.sampling for s in seqs]
        num_top = max(sp.top_logprobs for sp in sps)
        out = sample(logits, [sp.temperature for sp in sps], [sp.top_k for sp in sps],
                     [sp.top_p for sp in sps], [s.generator for s in seqs], num_top)
        for row, (seq, sp) in enumerate(zip(seqs, sps, strict=True)):
            token = out.token_ids[row]
            seq.token_ids.append(token)
            seq.logprobs.append(out.logprobs[row])
            seq.versions.append(self._version_of(seq.adapter))
            if sp.top_logprobs and out.top_ids is not None and out.top_logprobs is not None:
                seq.top.append(list(zip(out.top_ids[row][: sp.top_logprobs],
                                        out.top_logprobs[row][: sp.top_logprobs], strict=True)))
            stopped = (token == self.eos_token_id or token in self.eos_token_ids
                       or token in sp.stop_token_ids)
            if stopped or (sp.stop and self._hit_stop_string(seq.token_ids, sp.stop)):
                seq.finish_reason = "stop"
            elif len(seq.token_ids) >= sp.max_tokens:
                seq.finish_reason = "length"

    def _hit_stop_string(self, token_ids: list[int], stops: list[str]) -> bool:
        window = max(len(s.encode()) for s in stops) + 1  # a stop string spans at most this many
        ids = tuple(token_ids[-window:])
        tail = self._tail_texts.get(ids)
        if tail is None:  # decoding is deterministic: a remembered tail is the same text
            if len(self._tail_texts) >= TAIL_TEXTS:
                self._tail_texts.clear()
            tail = self._tail_texts[ids] = self.tokenizer.decode(list(ids),
                                                                 skip_special_tokens=False)
        return any(s and s in tail for s in stops)

    def _drop_finished(self) -> list[_Job]:
        keep = [i for i, s in enumerate(self._running) if s.finish_reason is None]
        if len(keep) == len(self._running):
            return []
        self._remember([(row, seq) for row, seq in enumerate(self._running)
                        if seq.finish_reason is not None])
        done_jobs = {id(s.job): s.job for s in self._running if s.finish_reason is not None}
        self._running = [self._running[i] for i in keep]
        self._batch.keep(keep)
        still = {id(s.job) for s in self._running + self._parked}
        return [job for key, job in done_jobs.items() if key not in still]

    def _remember(self, finished: list[tuple[int, _Seq]]) -> None:
        """Put the keys/values of finished ``(row, seq)`` in the prefix cache when their
        session may reuse them: not its ``last_turn``, not aborted, every token computed at the
        current version. Rows of one length are copied together (``RunningBatch.rows_kv``: one
        copy per layer instead of one per row and layer; a GRPO group's rows often finish
        together)."""
        by_length: dict[int, list[tuple[int, _Seq, list[int], int]]] = {}
        for row, seq in finished:
            request = seq.job.request
            if request.session_id is None or request.last_turn:  # nothing could reuse it
                continue
            version = self._version_of(seq.adapter)
            fed = list(request.prompt_ids) + seq.token_ids[:-1]  # the last token was never fed
            if (len(fed) > self._prefix_cache.max_tokens
                    or seq.finish_reason == "abort" or any(v != version for v in seq.versions)):
                continue
            by_length.setdefault(len(fed), []).append((row, seq, fed, version))
        for length, group in by_length.items():  # real positions of a row: prompt + fed
            copies = self._batch.rows_kv([row for row, *_ in group], length)
            for (_, seq, fed, version), (keys, values) in zip(group, copies, strict=True):
                self._prefix_cache.put(_cache_key(seq.job.request), fed, keys, values, version)

    def _publish(self, finished: list[_Job]) -> None:
        """Hand streaming jobs' new tokens to their ``on_tokens`` (on the event loop, after a
        hop); a receiver that raises fails its own request (its rows then abort)."""
        seqs = [s for s in self._running + self._parked if s.job.on_tokens is not None]
        seqs += [s for job in finished if job.on_tokens is not None for s in job.seqs]
        for seq in seqs:
            job, start = seq.job, seq.published
            if job.on_tokens is None or job.future.done() or len(seq.token_ids) == start:
                continue
            seq.published = len(seq.token_ids)
            top = seq.top[start:] if job.request.sampling.top_logprobs else None
            try:
                job.on_tokens(TokenDelta(seq.index, seq.token_ids[start:],
                                         seq.logprobs[start:], seq.versions[start:], top))
            except Exception as exc:
                log.exception("LocalEngine: on_tokens of request %s raised",
                              job.request.request_id)
                job.future.set_exception(EngineError(f"the token receiver failed: {exc!r}"))

    @staticmethod
    def _result(job: _Job) -> GenerateResult:
        outputs = [
            CompletionOutput(token_ids=s.token_ids, logprobs=s.logprobs, versions=s.versions,
                             finish_reason=s.finish_reason or "length",
                             top_logprobs=s.top if job.request.sampling.top_logprobs else None)
            for s in job.seqs
        ]
        return GenerateResult(job.request.request_id, list(job.request.prompt_ids), outputs)

    def _fail_all(self, error: Exception) -> None:
        jobs = list(self._waiting) + [s.job for s in self._running + self._parked]
        self._waiting.clear()
        self._running, self._batch, self._parked = [], RunningBatch(self.max_batch_size), []
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)


def _cache_key(request: GenerateRequest) -> str | None:
    """The prefix-cache key of a request: its session, apart per adapter."""
    if request.session_id is None or request.adapter is None:
        return request.session_id
    return f"{request.adapter}\x00{request.session_id}"


def _same_prompts(jobs: list[_Job]) -> list[list[_Job]]:
    """``jobs`` gathered by identical (adapter, prompt ids), in order of first arrival.

    Each list is prefilled once (its first job's prompt) and its keys/values copied to every
    job's rows: the members of a GRPO group send one prompt as separate requests, and their
    rows are what the prefill would compute for each of them.
    """
    same: dict[tuple[str | None, tuple[int, ...]], list[_Job]] = {}
    for job in jobs:
        same.setdefault((job.request.adapter, tuple(job.request.prompt_ids)), []).append(job)
    return list(same.values())


def _prefill_groups(prompts: list[list[_Job]], budget: int) -> list[list[list[_Job]]]:
    """Split ``prompts`` (``_same_prompts``) into consecutive groups whose padded prefill of
    one row per distinct prompt fits ``budget`` tokens."""
    groups: list[list[list[_Job]]] = []
    width = 0
    for same in prompts:
        length = len(same[0].request.prompt_ids)
        new_width = max(width, length)
        if groups and new_width * (len(groups[-1]) + 1) <= budget:
            groups[-1].append(same)
            width = new_width
        else:
            groups.append([same])
            width = length
    return groups
