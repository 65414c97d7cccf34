"""The inference engine: requests in, tokens out, many requests at once on one latent KV cache.

    engine = Engine(model, tokenizer)        # tokenizer may be None: prompts are token ids
    outs = engine.generate(["Hello", "Bonjour"], SamplingParams(max_tokens=32, temperature=0))
    rid = engine.add_request([0, 17, 42], params)   # the streaming interface (the server's):
    events = engine.step()                          #   one forward for every running request
    engine.cancel(rid)                              #   frees its blocks at once

Each step: the scheduler picks decode tokens and prefill chunks -> one packed forward (runner) -> a
token per finished prompt and per decoding sequence (sampler; with MTP speculation, one or two) ->
MTP drafts -> stop checks, text, events; finished sequences give their blocks back, full blocks are
published to the prefix cache. A prompt that asks for prompt_logprobs also turns each of its
chunks' positions into its tokens' logprobs; one with max_tokens=0 ends once computed (scoring).
Public methods are thread-safe (one lock): a server may add and cancel from one thread while
another steps.

Images: given a VisionLanguageModel, a request may carry images (an ImageInput, or PIL images that
are tiled here the VL2 way) for the `<image>` runs of its prompt (data/images.py
`image_prompt_ids` expands each placeholder). The tower encodes them once when the request is added;
at prefill their embeddings replace the image positions' token embeddings, and the latents land in
the cache like any prompt token's. The prefix cache mixes each image's content hash into the key of
every block that holds one of its positions, so the same ids with another image never share blocks.
(With MTP speculation the draft module sees the placeholder's embedding at image positions: drafts
only, the output is still the model's.)
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from nanoseek.engine.cache import BlockManager, LatentCache
from nanoseek.engine.compiled import choose_runner
from nanoseek.engine.sampling import Row, Sampler, SamplingParams, make_rng
from nanoseek.engine.scheduler import Scheduler
from nanoseek.engine.sequence import (
    FINISHED,
    PromptImages,
    Request,
    RequestOutput,
    StepEvent,
    TextStream,
)
from nanoseek.engine.sequence import Sequence as Seq
from nanoseek.engine.speculative import SpeculativeDecoder
from nanoseek.model.transformer import Transformer
from nanoseek.model.vision import ImageInput, VisionLanguageModel, image_token_count

# bytes of latent cache when neither num_blocks nor cache_memory is given
DEFAULT_CACHE_MEMORY = 1 << 30
# prompt positions whose logits are taken at once for prompt logprobs (bounds [rows, vocab] floats)
PROMPT_LOGPROB_ROWS = 256

Prompt = str | Sequence[int]


class Engine:
    def __init__(
        self,
        model: Transformer | VisionLanguageModel,
        tokenizer=None,
        *,
        max_batch_size: int = 64,
        block_size: int = 16,
        num_blocks: int | None = None,
        cache_memory: int | None = None,
        max_num_batched_tokens: int = 1024,
        max_model_len: int | None = None,
        enable_prefix_cache: bool = True,
        speculative: bool = False,
        decode: str | None = None,
        decode_dtype: str = "auto",
        decode_frozen: bool | None = None,
    ):
        """model: a nanoseek Transformer (any dtype and device; int8-quantized ones too). num_blocks
        sizes the cache pool directly; otherwise cache_memory (bytes, default 1 GiB) does, capped at
        what max_batch_size sequences of max_model_len tokens can use. max_model_len (default: the
        model's context) is further capped at the pool's capacity, so that any single request fits
        the pool on its own. A VisionLanguageModel's language model runs the engine and its tower
        encodes the requests' images. decode: "eager", "compiled" (decode steps run one compiled
        graph, engine/compiled.py) or "auto" (the faster, measured at start and printed; a graph
        compiles in up to about a minute the first time, and its package is kept on disk for the
        same weights); None (the default): $NANOSEEK_DECODE if set, else "auto". An engine whose
        model is being trained or that serves one batch passes "eager". decode_dtype: the compiled
        graph's weights, "float32", "bfloat16", "int8" (weight-only) or "auto" (fp32 or bf16,
        timed). decode_frozen: the compiled graph's weights compiled in as constants (faster; a
        weight change recompiles) or, False, graph inputs (a weight change is copied in, nothing
        recompiled: a policy trained between rollouts); None: compiled.INDUCTOR_OPTIONS["freezing"]
        (on)."""
        self.vision = None
        self.image_token_id = None
        if isinstance(model, VisionLanguageModel):
            self.vision = model.vision
            self.image_token_id = model.image_token_id
            model = model.language_model
        cfg = model.config
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("block_size", block_size),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if speculative and not len(model.mtp):
            raise ValueError(
                "speculative=True needs a model with an MTP module (num_nextn_predict_layers >= 1)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = cfg
        self.speculative = speculative
        weight = model.embed_tokens.weight
        num_layers = cfg.num_hidden_layers + (1 if speculative else 0)
        self.cache_bytes_per_token = LatentCache.bytes_per_token(
            num_layers, cfg.kv_lora_rank, cfg.qk_rope_head_dim, weight.dtype
        )
        context = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if num_blocks is None:
            budget = DEFAULT_CACHE_MEMORY if cache_memory is None else cache_memory
            num_blocks = min(
                budget // (self.cache_bytes_per_token * block_size),
                max_batch_size * -(-context // block_size),
            )
        if num_blocks < 1:
            raise ValueError(
                f"the cache pool needs at least one block (num_blocks={num_blocks}, one block of "
                f"{block_size} tokens takes {self.cache_bytes_per_token * block_size} bytes)"
            )
        self.max_model_len = min(context, num_blocks * block_size)
        self.cache = LatentCache(
            num_layers,
            num_blocks,
            block_size,
            cfg.kv_lora_rank,
            cfg.qk_rope_head_dim,
            weight.dtype,
            weight.device,
        )
        self.blocks = BlockManager(
            num_blocks, block_size, enable_prefix_cache, lookahead=1 if speculative else 0
        )
        self.scheduler = Scheduler(
            self.blocks,
            max_batch_size,
            max_num_batched_tokens,
            decode_width=2 if speculative else 1,
        )
        self.runner = choose_runner(
            model, self.cache, num_layers, decode, decode_dtype, decode_frozen
        )
        # the weights' version the prefix cache's latents come from (weights.py counts rebuilds)
        self._cache_generation = self.runner.weights.generation
        self.sampler = Sampler()
        self.spec = SpeculativeDecoder(self.sampler) if speculative else None
        eos = (
            tokenizer.eos_id
            if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None
            else cfg.eos_token_id
        )
        self.eos_ids = frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)
        self._requests: dict[str, Request] = {}
        # cancellations, for the next step
        self._events: list[tuple[StepEvent, Callable | None]] = []
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self.counters = dict(
            steps=0, prompt_tokens=0, cached_prompt_tokens=0, prefill_tokens=0, generated_tokens=0
        )

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: Prompt) -> tuple[list[int], str | None]:
        """A prompt -> (token ids, text). Text is encoded with the tokenizer, after its BOS token
        (the way documents are seen in training) unless the encoding already starts with it."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "a text prompt needs a tokenizer: pass Engine(model, tokenizer) or token ids"
                )
            ids = list(self.tokenizer.encode(prompt))
            bos = getattr(self.tokenizer, "bos_id", None)
            if bos is not None and (not ids or ids[0] != bos):
                ids.insert(0, bos)
            return ids, prompt
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("a token-id prompt must be a list of ints")
        return ids, None

    def check(self, ids: list[int], params: SamplingParams) -> None:
        """Everything that would make a request fail, as a ValueError, before any work is done."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(params).__name__}")
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})"
            )
        # a prompt may fill the context only when it is scored alone (max_tokens=0)
        if len(ids) > self.max_model_len or (len(ids) == self.max_model_len and params.max_tokens):
            room = "is shorter" if len(ids) > self.max_model_len else "leaves no room to generate"
            raise ValueError(
                f"the prompt has {len(ids)} tokens; this engine's context is {self.max_model_len} "
                f"tokens and {room}"
            )
        if params.stop_list and self.tokenizer is None:
            raise ValueError(
                "stop strings need a tokenizer (use stop_token_ids with token-id prompts)"
            )
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.config.vocab_size:
                raise ValueError(
                    f"{name}={k} is more than the vocabulary ({self.config.vocab_size})"
                )
        if params.n > self.scheduler.max_batch_size:
            raise ValueError(
                f"n={params.n} is more than max_batch_size={self.scheduler.max_batch_size}"
            )

    def images_of(self, ids: list[int], images) -> PromptImages | None:
        """A prompt's images (None, an ImageInput, or PIL images) -> their embeddings and spans,
        checked against the prompt's image positions. ValueError names what does not pair up."""
        image_id = self.image_token_id
        n_slots = 0 if image_id is None else sum(t == image_id for t in ids)
        if images is None or (not isinstance(images, ImageInput) and not len(images)):
            if n_slots:
                raise ValueError(f"the prompt has {n_slots} <image> positions but no images")
            return None
        if self.vision is None:
            raise ValueError("images need a vision-language model; this engine's model reads text")
        vcfg = self.vision.config
        if not isinstance(images, ImageInput):
            from nanoseek.data.images import image_input

            images = image_input(list(images), vcfg)
        counts = [image_token_count(vcfg, g) for g in images.grids]
        if sum(counts) != n_slots:
            raise ValueError(
                f"the {len(counts)} image(s) take {sum(counts)} positions but the prompt has "
                f"{n_slots} <image> positions (expand each placeholder with data/images.py "
                "expand_image_tokens or image_prompt_ids)"
            )
        with torch.inference_mode():
            embeds = self.vision(images)
        positions = [i for i, t in enumerate(ids) if t == image_id]
        index = torch.full((len(ids),), -1, dtype=torch.long)
        index[positions] = torch.arange(len(positions))
        spans = []
        tile = 0
        pos = 0
        for (tw, th), n in zip(images.grids, counts):
            pixels = images.pixel_values[tile : tile + 1 + tw * th]
            tile += 1 + tw * th
            digest = hashlib.blake2b(digest_size=16)
            digest.update(repr((tw, th, tuple(pixels.shape), str(pixels.dtype))).encode())
            digest.update(pixels.detach().cpu().contiguous().numpy().tobytes())
            spans.append((positions[pos], positions[pos + n - 1] + 1, digest.digest()))
            pos += n
        return PromptImages(embeds, index, tuple(spans))

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        callback: Callable[[StepEvent], None] | None = None,
        group: str | None = None,
        images=None,
    ) -> str:
        """Queue a request (text or token ids); it joins the running batch at a coming step.
        callback, if given, receives each of its StepEvents. group (default: the request id) is whom
        the scheduler shares the batch between: a server gives every prompt of one client request
        the same group. images: for a vision-language model, the prompt's images in placeholder
        order (an ImageInput or PIL images). -> its request id."""
        ids, text = self.encode(prompt)
        params = SamplingParams() if params is None else params
        self.check(ids, params)
        pimages = self.images_of(ids, images)
        return self._add(ids, text, params, request_id, callback, group, pimages).request_id

    def _add(self, ids, text, params, request_id, callback, group=None, images=None) -> Request:
        with self._lock:
            rid = f"req-{next(self._ids)}" if request_id is None else str(request_id)
            if rid in self._requests:
                raise ValueError(f"request id {rid!r} is already in use")
            req = Request(rid, ids, params, text, callback, group, images)
            seq = self._sequence(req, 0, ids)
            seq.pending_forks = params.n - 1
            self._requests[rid] = req
            self.scheduler.add(seq)
            return req

    def _sequence(self, req: Request, index: int, token_ids: list[int]) -> Seq:
        detok = (
            None
            if self.tokenizer is None
            else TextStream(self.tokenizer, req.output.prompt_token_ids, req.params.stop_list)
        )
        seq = Seq(req, index, token_ids, make_rng(req.params.seed, index), detok)
        req.output.outputs[index].text = None if detok is None else ""
        req.sequences.append(seq)
        return seq

    def cancel(self, request_id: str) -> bool:
        """Stop a request now: its blocks are freed at once; the next step reports it with
        finish_reason "cancelled". -> False if it is unknown or already finished."""
        with self._lock:
            req = self._requests.pop(request_id, None)
            if req is None:
                return False
            done = {seq.index for seq in req.sequences if seq.status == FINISHED}
            for seq in req.sequences:
                if seq.status != FINISHED:
                    self.scheduler.finish(seq)
            req.output.finished = True
            for comp in req.output.outputs:
                if comp.index not in done:
                    comp.finish_reason = "cancelled"
                    ev = StepEvent(
                        req.request_id,
                        comp.index,
                        [],
                        None if comp.text is None else "",
                        [] if comp.logprobs is not None else None,
                        True,
                        "cancelled",
                        req.output,
                    )
                    self._events.append((ev, req.callback))
            return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[StepEvent]:
        """Run one forward for every scheduled request. -> what each
        completion gained (callbacks get theirs)."""
        with self._lock, torch.inference_mode():
            pending = self._events
            self._events = []
            if self.scheduler.waiting:
                self._follow_weights()
            batch = self.scheduler.schedule()
            if batch:
                pending += self._run(batch)
                self.counters["steps"] += 1
            for ev, callback in pending:
                if callback is not None:
                    callback(ev)
            return [ev for ev, _ in pending]

    def _follow_weights(self) -> None:
        """Before prompts are admitted: if the model's weights changed (a policy trained between
        rollouts), the runner takes the new ones (InferenceWeights.current refolds them; a
        compiled step copies them in or is rebuilt) and every cached prefix, computed with the
        old ones, is forgotten. Checked here rather than at every step: reading every tensor's
        version costs 25-30 us, 2-3% of a compiled decode step, and a sequence already decoding
        holds latents of the weights it started with anyway."""
        generation = self.runner.weights.current().generation
        if generation != self._cache_generation:
            self.blocks.forget_prefixes()
            self._cache_generation = generation

    def _run(self, batch) -> list[tuple[StepEvent, Callable | None]]:
        decode, width = batch.decode, self.scheduler.decode_width
        self.cache.copy_blocks(batch.copies)
        drafts = (
            [s.token_ids[-1] if s.draft is None else s.draft for s in decode] if self.spec else []
        )
        positions = [s.num_computed for s in decode]
        inp = self.runner.prepare(decode, batch.prefill, width, drafts)
        hidden = self.runner.forward(inp)

        # (sequence, hidden row of its last prompt token) for prompts this step finishes; those
        # with max_tokens=0 are scored only: they end here, nothing is sampled
        completed = []
        scored = []
        for (seq, n), chunk in zip(batch.prefill, inp.chunks):
            if not seq.admitted:
                self._admitted(seq)
            if seq.needs_prompt_logprobs:
                self._prompt_logprobs(seq, chunk, hidden)
            seq.num_computed += n
            self.counters["prefill_tokens"] += n
            if seq.num_computed == len(seq.token_ids):
                seq.request.prompt_logprobs_done = True
                if seq.params.max_tokens == 0:
                    scored.append(seq)
                else:
                    completed.append((seq, chunk.start + n - 1))
        nd = len(decode) * width
        wanted = hidden  # a pure-decode step needs every row: no copy
        if completed or nd != len(hidden):
            wanted = hidden[list(range(nd)) + [row for _, row in completed]]
        logits = self.runner.logits(wanted)
        new, families = self._sample(decode, drafts, completed, logits)
        results = self._append_tokens(new, logits)
        for seq in scored:
            results += [(s, [], [], "length") for s in (seq, *self._fork(seq))]
        # before any block is freed: the MTP layer's latents go into this step's slots
        if self.spec:
            self._draft(batch, inp, hidden, positions, new, families, completed)
        for seq, _ in batch.prefill:
            self.blocks.publish(seq)
        return [
            (self._finish_step(seq, added, lps, reason), seq.request.callback)
            for seq, added, lps, reason in results
        ]

    def _prompt_logprobs(self, seq: Seq, chunk, hidden: torch.Tensor) -> None:
        """Record the logprobs of the prompt tokens this prefill chunk predicts: its row at position
        p gives token p + 1 (the last prompt position predicts the first output token, not a
        prompt token). In slices, so that a long chunk never holds all its [rows, vocab] logits."""
        out = seq.request.output.prompt_logprobs
        k = seq.params.prompt_logprobs
        start = chunk.cached
        stop = min(chunk.cached + chunk.length, seq.num_prompt - 1)
        for p in range(start, stop, PROMPT_LOGPROB_ROWS):
            q = min(p + PROMPT_LOGPROB_ROWS, stop)
            row = chunk.start + p - chunk.cached
            logits = self.runner.logits(hidden[row : row + q - p])
            targets = seq.token_ids[p + 1 : q + 1]
            out[p + 1 : q + 1] = self.sampler.logprobs(logits, targets, [k] * len(targets))

    def _sample(self, decode: list[Seq], drafts: list[int], completed: list, logits: torch.Tensor):
        """-> new tokens per sequence as (token, logit row) pairs, and the families of completed
        prompts (the sequence, then the siblings forked off it, which sample from the same row)."""
        nd = len(decode) * self.scheduler.decode_width
        new: list[tuple[Seq, list[tuple[int, int]]]] = []
        if decode:
            if self.spec:
                per_seq = self.spec.verify(logits[:nd], decode, drafts)
            else:
                tokens = self.sampler.sample(logits[:nd], [self._row(s) for s in decode])
                per_seq = [[(t, i)] for i, t in enumerate(tokens)]
            for seq, toks in zip(decode, per_seq):
                seq.num_computed += len(toks)  # the last token, and the draft when it was accepted
                new.append((seq, toks))
        families = []
        for seq, _ in completed:
            seq.in_decode = True
            families.append([seq, *self._fork(seq)])
        rows = [(s, nd + k) for k, family in enumerate(families) for s in family]
        if rows:
            tokens = self.sampler.sample(
                logits[[r for _, r in rows]], [self._row(s) for s, _ in rows]
            )
            new += [(s, [(t, r)]) for (s, r), t in zip(rows, tokens)]
        return new, families

    def _append_tokens(self, new: list, logits: torch.Tensor) -> list:
        """Append each sequence's new tokens (with their logprobs) until one finishes it.
        -> (sequence, tokens added, logprobs added, finish reason or None) per sequence."""
        wanted = [(s, t, r) for s, toks in new if s.params.logprobs is not None for t, r in toks]
        logprobs = {}
        if wanted:
            lps = self.sampler.logprobs(
                logits[[r for _, _, r in wanted]],
                [t for _, t, _ in wanted],
                [s.params.logprobs for s, _, _ in wanted],
            )
            logprobs = {(id(s), r): lp for (s, _, r), lp in zip(wanted, lps)}
        results = []
        for seq, toks in new:
            added = []
            lps = []
            reason = None
            for t, r in toks:
                added.append(t)
                lp = logprobs.get((id(seq), r))
                if lp is not None:
                    lps.append(lp)
                reason = self._append(seq, t, lp)
                if reason:
                    break
            results.append((seq, added, lps, reason))
        return results

    def _draft(
        self,
        batch,
        inp,
        hidden: torch.Tensor,
        positions: list[int],
        new: list,
        families: list,
        completed: list,
    ) -> None:
        """Run the MTP module over the step and set every sequence's next draft. Row i of the step
        (position q) gets the token at q+1, now known; a rejected draft's row gets a placeholder
        (its slot is rewritten)."""
        width, decode = self.scheduler.decode_width, batch.decode
        next_ids = []
        rows = []
        owners = []
        for i, (seq, p) in enumerate(zip(decode, positions)):
            ids = seq.token_ids
            next_ids += [ids[p + 1], ids[p + 2] if p + 2 < len(ids) else 0]
            rows.append(width * i + len(new[i][1]) - 1)  # the last accepted position
            owners.append([seq])
        for (seq, n), chunk in zip(batch.prefill, inp.chunks):
            ids = seq.token_ids[chunk.cached + 1 : chunk.cached + n + 1]
            next_ids += ids + [0] * (n - len(ids))  # a scored-only prompt has no next token
        for family, (_, row) in zip(families, completed):
            rows.append(row)
            owners.append(family)  # siblings start from the parent's draft (it is only a guess)
        for family, d in zip(owners, self.spec.draft(self.runner, inp, hidden, next_ids, rows)):
            for s in family:
                s.draft = d

    def _row(self, seq: Seq) -> Row:
        return Row(seq.params, seq.rng, seq.token_ids, seq.num_prompt)

    def _admitted(self, seq: Seq) -> None:
        seq.admitted = True
        if seq.index == 0:
            seq.request.output.cached_tokens = seq.num_computed
            self.counters["prompt_tokens"] += seq.num_prompt
            self.counters["cached_prompt_tokens"] += seq.num_computed

    def _fork(self, parent: Seq) -> list[Seq]:
        """n > 1: the siblings start from the parent's computed prompt, sharing its blocks."""
        children = []
        for _ in range(parent.pending_forks):
            child = self._sequence(parent.request, len(parent.request.sequences), parent.token_ids)
            child.num_computed = parent.num_computed
            child.in_decode = True
            child.admitted = True
            self.blocks.fork(parent, child)
            self.scheduler.add_running(child)
            children.append(child)
        parent.pending_forks = 0
        return children

    def _append(self, seq: Seq, token: int, logprob) -> str | None:
        """Add a sampled token. -> the finish reason, if it ends the completion."""
        seq.token_ids.append(token)
        comp, p = seq.completion, seq.params
        comp.token_ids.append(token)
        if logprob is not None:
            comp.logprobs.append(logprob)
        self.counters["generated_tokens"] += 1
        if token in p.stop_ids or (token in self.eos_ids and not p.ignore_eos):
            return "stop"  # the stop token stays in token_ids but adds no text
        if seq.detok is not None and seq.detok.push(token):
            return "stop"
        if len(comp.token_ids) >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def _finish_step(self, seq: Seq, added: list[int], lps: list, reason: str | None) -> StepEvent:
        self.blocks.publish(seq)
        comp, req = seq.completion, seq.request
        text = None
        if seq.detok is not None:
            if reason:
                seq.detok.finish()
            text = seq.detok.take(final=reason is not None)
            comp.text = seq.detok.text
        if reason:
            comp.finish_reason = reason
            self.scheduler.finish(seq)
            if all(c.finish_reason for c in req.output.outputs):
                req.output.finished = True
                self._requests.pop(req.request_id, None)
        return StepEvent(
            req.request_id,
            seq.index,
            added,
            text,
            lps if seq.params.logprobs is not None else None,
            reason is not None,
            reason,
            req.output,
        )

    # ------------------------------------------------------------------ convenience
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        images: Sequence | None = None,
    ) -> list[RequestOutput]:
        """Run prompts (texts, or token-id lists) to completion, all batched together.
        images: one entry per prompt (None, an ImageInput or PIL images; see add_request).
        Every prompt and every SamplingParams is checked before any work starts. ->
        one RequestOutput per prompt, in order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts")
        encoded = [self.encode(p) for p in prompts]
        for (ids, _), sp in zip(encoded, params):
            self.check(ids, sp)
        pimages = [self.images_of(ids, im) for (ids, _), im in zip(encoded, images)]
        reqs = [
            self._add(ids, text, sp, None, None, None, pi)
            for (ids, text), sp, pi in zip(encoded, params, pimages)
        ]
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(reqs), desc="generate", unit="req")
        try:
            while not all(r.output.finished for r in reqs):
                if not self.step() and not self.scheduler.running:
                    # a bug
                    raise RuntimeError("the engine made no progress with requests still waiting")
                if bar is not None:
                    bar.update(sum(r.output.finished for r in reqs) - bar.n)
        except BaseException:
            for r in reqs:
                self.cancel(r.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [r.output for r in reqs]

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None, images=None
    ) -> Iterator[StepEvent]:
        """Yield one request's events as its tokens come, driving the engine (other
        requests advance too and get their events through their callbacks). Closing
        the iterator early cancels the request."""
        ids, text = self.encode(prompt)
        params = SamplingParams() if params is None else params
        self.check(ids, params)
        req = self._add(ids, text, params, None, None, None, self.images_of(ids, images))
        try:
            while not req.output.finished:
                for ev in self.step():
                    if ev.request_id == req.request_id:
                        yield ev
        finally:
            self.cancel(req.request_id)

    def stats(self) -> dict:
        """Load and cache figures, for logs and the server's /metrics."""
        with self._lock:
            c = self.counters
            return dict(
                running=len(self.scheduler.running),
                waiting=len(self.scheduler.waiting),
                free_blocks=self.blocks.num_free,
                cached_blocks=len(self.blocks.evictable),
                total_blocks=self.blocks.num_blocks,
                block_size=self.blocks.block_size,
                capacity_tokens=self.cache.capacity_tokens,
                cache_bytes_per_token=self.cache_bytes_per_token,
                max_model_len=self.max_model_len,
                preemptions=self.scheduler.num_preemptions,
                **c,
                prefix_cache_hit_rate=c["cached_prompt_tokens"] / c["prompt_tokens"]
                if c["prompt_tokens"]
                else 0.0,
                speculative=self.spec is not None,
                spec_drafted=self.spec.drafted if self.spec else 0,
                spec_accepted=self.spec.accepted if self.spec else 0,
                spec_acceptance_rate=self.spec.acceptance_rate if self.spec else None,
            )
