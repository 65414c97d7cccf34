"""One forward pass over a packed batch: decode tokens and prefill chunks of
many sequences, on the latent cache.

All tokens of a step are laid out in one row [N, d] (decode tokens first, `width` per sequence, then
the prefill chunks), so every projection, norm and expert runs once per layer for the whole batch.
Only attention looks at sequences, and only through the cache:
- decode: absorbed MLA, the model's own math (model/attention.py). The query moves into latent
  space (W_UK), scores are taken against the cached [c_kv | k_rope] rows gathered for all sequences
  with one index op, the value read is c_kv itself and W_UV maps it back: nothing is expanded per
  head.
- prefill: expanded MLA with SDPA, as in training; a chunk that continues after cached tokens
  (prefix-cache hit, chunked prompt) gathers its context latents, expands them and attends with a
  causal offset mask.
The weights come in the inference layout of weights.py (same math, fewer and faster launches).
A prompt's image positions (a vision-language model's `<image>` run) get the image embeddings in
place of the token embedding at prefill; decode tokens are always text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.engine.cache import LatentCache
from nanoseek.engine.weights import Attention, BlockWeights, InferenceWeights, rms_normalize
from nanoseek.model.attention import absorb_query, attend_latent, expand_output, values_for_sdpa
from nanoseek.model.transformer import Transformer


@dataclass
class Chunk:
    """A prefill chunk: rows [start, start + length) of the batch, at
    positions [cached, cached + length)."""

    start: int
    length: int
    cached: int
    context: torch.Tensor | None  # slots of positions [0, cached + length) when cached > 0
    mask: torch.Tensor | None  # [length, cached + length] bool, True = may attend


@dataclass
class StepInput:
    ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] where each token's latents go
    num_decode: int  # decoding sequences; their rows are the first num_decode * width
    width: int
    decode_slots: torch.Tensor | None  # [B, S] cache rows each decoding sequence attends to
    decode_bias: torch.Tensor | None  # [B, width * H, S] 0 or -inf
    chunks: list[Chunk]
    # [N, rope]: each position's angles, repeated for both dims of a pair
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    # prefill rows that are image positions [M], and the embeddings that replace theirs [M, d]
    image_rows: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    # a compiled runner's pure-decode step: the graph's padded inputs (ids, cos, sin, context,
    # bias); such a step has no decode_bias (engine/compiled.py)
    padded: tuple | None = None


class ModelRunner:
    def __init__(self, model: Transformer, cache: LatentCache, num_layers: int):
        self.model = model
        self.cache = cache
        # cache layers: the main ones, then the MTP block when speculating
        self.num_layers = num_layers
        self.device = model.embed_tokens.weight.device
        self.n_heads = model.config.num_attention_heads
        self.kv_rank = model.config.kv_lora_rank
        self.weights = InferenceWeights(model, with_mtp=num_layers > len(model.layers))

    # ------------------------------------------------------------------ packing
    def prepare(
        self, decode: list, prefill: list[tuple[object, int]], width: int, drafts: list[int]
    ) -> StepInput:
        """Lay out a step: decode holds sequences with one uncomputed token (followed by drafts[i]
        when width == 2), prefill (sequence, n) pairs whose next n tokens are computed."""
        bs, dev = self.cache.block_size, self.device
        ids = []
        positions = []
        blocks = []
        for i, seq in enumerate(decode):
            ids += [seq.token_ids[-1], drafts[i]] if width == 2 else [seq.token_ids[-1]]
            for q in range(seq.num_computed, seq.num_computed + width):
                positions.append(q)
                blocks.append(seq.block_table[q // bs])
        positions = [torch.tensor(positions, dtype=torch.long)]
        slots = [_slots(torch.tensor(blocks, dtype=torch.long), positions[0], bs)]
        decode_slots = decode_bias = None
        if decode:  # every decoding sequence's cache rows, padded to the longest and masked
            S = max(seq.num_computed for seq in decode) + width
            n_blocks = -(-S // bs)
            table = torch.tensor([(seq.block_table + [0] * n_blocks)[:n_blocks] for seq in decode])
            decode_slots = (table.unsqueeze(-1) * bs + torch.arange(bs)).flatten(1)[:, :S]
            visible = torch.arange(S) <= positions[0].view(len(decode), width, 1)  # [B, width, S]
            bias = torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
            decode_bias = (
                bias.unsqueeze(2).expand(-1, -1, self.n_heads, -1).reshape(len(decode), -1, S)
            )

        chunks, start = [], len(ids)
        image_rows = []
        image_embeds = []
        for seq, n in prefill:
            c = seq.num_computed
            ids += seq.token_ids[c : c + n]
            images = getattr(seq, "images", None)
            if images is not None:  # the chunk's image positions take the image's embeddings
                index = images.index[c : c + n]
                rows = (index >= 0).nonzero().flatten()
                if len(rows):
                    image_rows.append(rows + start)
                    image_embeds.append(images.embeds[index[rows]])
            pos = torch.arange(c, c + n)
            table = torch.tensor(seq.block_table)
            positions.append(pos)
            slots.append(_slots(table[pos // bs], pos, bs))
            context = mask = None
            # the chunk continues after cached tokens: attend over all of them, causally shifted
            if c:
                ctx = torch.arange(c + n)
                context, mask = (
                    _slots(table[ctx // bs], ctx, bs).to(dev),
                    (ctx <= pos.unsqueeze(1)).to(dev),
                )
            chunks.append(Chunk(start, n, c, context, mask))
            start += n
        positions = torch.cat(positions).to(dev)
        cos, sin = self.model.rope(positions)
        return StepInput(
            ids=torch.tensor(ids, device=dev),
            positions=positions,
            slots=torch.cat(slots).to(dev),
            num_decode=len(decode),
            width=width,
            decode_slots=None if decode_slots is None else decode_slots.to(dev),
            decode_bias=None if decode_bias is None else decode_bias.to(dev),
            chunks=chunks,
            cos=cos.repeat_interleave(2, dim=-1),
            sin=sin.repeat_interleave(2, dim=-1),
            image_rows=torch.cat(image_rows).to(dev) if image_rows else None,
            image_embeds=torch.cat(image_embeds).to(dev) if image_embeds else None,
        )

    # ------------------------------------------------------------------ forward
    def forward(self, inp: StepInput) -> torch.Tensor:
        """-> final-normed hidden states [N, d] of every token of the step."""
        x = self.model.embed_tokens(inp.ids)
        if inp.image_rows is not None:
            x = x.index_copy(0, inp.image_rows, inp.image_embeds.to(x.dtype))
        for layer in range(len(self.model.layers)):
            x = self.block(self.weights.blocks[layer], layer, x, inp)
        return self.model.norm(x)

    def mtp_forward(
        self, inp: StepInput, hidden: torch.Tensor, next_ids: torch.Tensor
    ) -> torch.Tensor:
        """The first MTP module over the step's tokens: position i sees h_i and token i+1
        -> its normed output [N, d], whose head predicts token i+2. Writes the MTP
        block's latents to the last cache layer."""
        model = self.model
        mtp = self.model.mtp[0]
        layer = self.num_layers - 1
        x = self.weights.eh_proj(
            torch.cat((mtp.enorm(model.embed_tokens(next_ids)), mtp.hnorm(hidden)), dim=-1)
        )
        return mtp.norm(self.block(self.weights.blocks[layer], layer, x, inp))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _fp32(self.weights.lm_head(hidden))

    def block(self, w: BlockWeights, layer: int, x: torch.Tensor, inp: StepInput) -> torch.Tensor:
        x = x + self.attention(w.attn, layer, x, inp)
        return x + w.ffn(rms_normalize(x, w.ffn_eps) * w.ffn_norm)

    # ------------------------------------------------------------------ attention
    def attention(
        self, attn: Attention, layer: int, x: torch.Tensor, inp: StepInput
    ) -> torch.Tensor:
        """x [N, d] (block input) -> attention output [N, d]; stores the
        step's latents in the cache first."""
        q_nope, q_rope, c_kv, k_rope = attn.project(x, inp.cos, inp.sin)
        self.cache.write(layer, inp.slots, c_kv, k_rope)
        nd, outs = inp.num_decode * inp.width, []
        if nd:
            q = absorb_query(q_nope[:nd], q_rope[:nd], attn.w_uk)
            outs.append(expand_output(self.decode_attention(attn, layer, q, inp), attn.w_uv_t))
        if inp.chunks:
            q = torch.cat((q_nope[nd:], q_rope[nd:]), dim=-1)
            outs += [
                self.prefill_attention(
                    attn,
                    layer,
                    q[ch.start - nd : ch.start - nd + ch.length],
                    c_kv[ch.start : ch.start + ch.length],
                    k_rope[ch.start : ch.start + ch.length],
                    ch,
                )
                for ch in inp.chunks
            ]
        return attn.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))

    def decode_attention(
        self, attn: Attention, layer: int, q: torch.Tensor, inp: StepInput
    ) -> torch.Tensor:
        """Absorbed attention over the paged latents: q [B*width, H, C + rope]
        -> latent outputs [B*width, H, C]."""
        kv = self.cache.gather(layer, inp.decode_slots)  # [B, S, C + rope]
        q = q.reshape(inp.num_decode, -1, kv.shape[-1])  # [B, width*H, C + rope]
        o_latent = attend_latent(q, kv, inp.decode_bias, attn.scale, self.kv_rank)
        return o_latent.view(-1, self.n_heads, self.kv_rank)

    def prefill_attention(
        self,
        attn: Attention,
        layer: int,
        q: torch.Tensor,
        c_kv: torch.Tensor,
        k_rope: torch.Tensor,
        ch: Chunk,
    ) -> torch.Tensor:
        """Expanded attention of one chunk: q [T, H, nope + rope] over its context -> [T, H*v]."""
        if ch.cached:
            ctx = self.cache.gather(layer, ch.context)
            c_kv, k_rope = ctx[:, : self.kv_rank], ctx[:, self.kv_rank :]
        k, v = attn.expand(c_kv, k_rope)  # [1, H, S, *]
        q = q.transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(
            q,
            k,
            values_for_sdpa(v, q),
            attn_mask=ch.mask,
            is_causal=not ch.cached,
            scale=attn.scale,
        )
        return o[0, ..., : v.shape[-1]].transpose(0, 1).flatten(1)


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _slots(blocks: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache rows of tokens at `positions` whose blocks are `blocks` (both [N])."""
    return blocks * block_size + positions % block_size
