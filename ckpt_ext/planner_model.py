"""The planner's memory and time model of one training step of a Hugging Face model (planner_spec.ModelSpec), per
checkpointing strategy (a kind per layer) and LM head.

Memory (bytes; N = B·T tokens, d width, V vocabulary, act = param dtype bytes, mm = compute dtype bytes):
  layers      per layer its input x (N·d·act) + what its kind keeps: ckpt_ext policies from the policy table
              (policies.py; the post-LN table for post-LN families), Hugging Face's own layer ("eager") and
              torch.utils.checkpoint traced under fake tensors (planner_trace.py) + LoRA (N·r·mm per adapter; none under
              torch checkpoint). Traced bytes are affine in the batch and quadratic in T (the (B, 1, T, T) mask), so six
              small traces give them at any shape; ``exact=True`` traces the shape itself.
  embedding   the embedding dropout's mask (N·d bool) when that dropout is on; the model's (B, 1, T, T) bool mask when
              torch checkpoint keeps it as an input; an embedding LayerNorm's input (N·d·act) and saved tensors
              (traced; BERT).
  HF head     final norm (traced) + lm_head's saved input (N·d·mm) + labels (N·8) + the autocast bf16 copy of the
              head weight (V·d·2) + logits (mm·V per token, held by the output when keep_logits) + fp32 log-probs
              (4·V, saved by log_softmax; ``logits.float()`` in ForCausalLMLoss); in backward the loss gradient and the
              log-softmax gradient (2 × 4·V) are alive at once beside them: ~6·V retained, ~14·V at the peak in bf16.
  fused head  final norm + its output (the op's input) + fp32 logsumexp (4 B/token) + labels; in backward one chunk
              buffer (fused_chunk_bytes, at most the (N, V) fp32 logits) and the hidden-state gradient (N·d·act). No
              (N, V) tensor is kept.
  peak        the largest of: the end of the forward (all layers + autocast's cached weight copies of torch-
              checkpointed layers + the head's forward, with the fp32 logits copy); the head's backward (all layers +
              head peak); each layer i's backward (embedding + layers before i + layer i's traced peak, which holds its
              recompute and gradients, + the logits the caller still holds).
Checked against CPU training steps of tiny GPT-2 and Llama models in tests/test_plan_hf.py (within 10%).
Time: one forward + backward of each layer kind priced by ckpt_ext.roofline on the model's own layer (fake trace) at
B·T ≈ 8192 tokens (PRICE_TOKENS, a GPU-filling size), plus the head (3 matmuls + 6 passes over (N, V) for Hugging
Face's; 4 matmuls + 2 chunked passes for the fused head). Embeddings are not priced.
"""

from __future__ import annotations

from .planner_spec import ModelSpec
from .policies import POLICIES, retained_bytes

PRICE_TOKENS = 8192


KINDS = ("eager", "checkpoint", *POLICIES)


class MemoryModel:
    """Bytes and modeled seconds of one step of ``spec`` under ``setup`` (see the module docstring)."""

    def __init__(self, spec: ModelSpec, exact: bool = False):
        """``exact``: trace every (batch, T) asked for instead of interpolating (slower; the search verifies its
        answer this way, since a peak, a maximum over the step, is quadratic in T only piecewise)."""
        self.spec, self.setup, self.exact = spec, spec.setup, exact
        self._rope = spec.head_dim if spec.family.rope else None

    # ---- per layer: every traced tensor is (fixed or) batch x (1, T or T^2) elements, so bytes are affine in the batch
    # and quadratic in T: traces at batch 1, 2 and T = 64, 128, 192 give them exactly at any (batch, T).
    def _traced(self, kind: str, seq: int, batch: int, field: str) -> int:
        from .planner_trace import trace_layer

        s, mask = self.setup, self.spec.family.causal_mask

        def at(b, t):
            trace = trace_layer(self.spec.template, kind, t, s.param_dtype, s.compute_dtype, self._rope, b, mask)
            return getattr(trace, field)

        return at(batch, seq) if self.exact else _bilinear_quadratic(at, batch, seq)

    def layer_bytes(self, kind: str, batch: int, seq: int) -> int:
        """Activation bytes one ``kind`` layer keeps, its input included."""
        sp, s = self.spec, self.setup
        n = batch * seq
        x = n * sp.d * s.act
        lora = 0 if kind == "checkpoint" else sp.lora_modules * n * s.lora_rank * s.mm
        if kind in POLICIES:
            kept = retained_bytes(kind, batch, seq, sp.d, sp.n_heads, sp.hidden, act_bytes=s.act, matmul_bytes=s.mm,
                                  stat_bytes=4, n_kv_heads=sp.n_kv, head_dim=sp.head_dim, norm=sp.family.norm,
                                  mlp=sp.family.mlp, qk_norm=sp.family.qk_norm,
                                  placement=sp.family.placement,
                                  ln2_from_out=sp.family.placement == "post" and s.act >= 4)  # fmt: skip
        elif kind in ("eager", "checkpoint"):
            kept = self._traced(kind, seq, batch, "retained")
        else:
            raise ValueError(f"unknown layer kind {kind!r}; choose one of {', '.join(KINDS)}")
        return x + kept + lora

    def layer_peak(self, kind: str, batch: int, seq: int) -> int:
        """Bytes alive while one ``kind`` layer runs its backward: its input, kept bytes, recompute and gradients."""
        sp, s = self.spec, self.setup
        n = batch * seq
        lora = 0 if kind == "checkpoint" else sp.lora_modules * n * s.lora_rank * s.mm
        return n * sp.d * s.act + self._traced(kind, seq, batch, "peak") + lora

    # ---- embedding and head
    def embed_bytes(self, kinds: tuple[str, ...], batch: int, seq: int) -> int:
        """The embedding dropout's mask, the embeddings' LayerNorm (its input sum and what it saves; BERT), and the
        model's (B, 1, T, T) bool mask when torch checkpoint keeps it as an input of the layers it wraps."""
        sp, s = self.spec, self.setup
        dropout = batch * seq * sp.d if sp.embed_dropout > 0 else 0
        mask = batch * seq * seq if sp.family.causal_mask and "checkpoint" in kinds else 0
        norm = 0
        if sp.embed_norm_module is not None:
            from .planner_trace import trace_module

            norm = batch * seq * sp.d * s.act + _bilinear_quadratic(
                lambda b, t: trace_module(sp.embed_norm_module, t, sp.d, s.param_dtype, s.compute_dtype, b), batch, seq
            )
        return dropout + mask + norm

    def _norm_bytes(self, seq: int, batch: int) -> int:
        from .planner_trace import trace_module

        s = self.setup
        return _bilinear_quadratic(lambda b, t: trace_module(self.spec.norm_module, t, self.spec.d, s.param_dtype,
                                                             s.compute_dtype, b), batch, seq)  # fmt: skip

    def head_bytes(self, head: str, batch: int, seq: int) -> tuple[int, int]:
        """(kept after forward, alive at the head's backward peak) of the final norm, head and loss."""
        sp, s = self.spec, self.setup
        n = batch * seq
        base = n * sp.d * s.act + self._norm_bytes(seq, batch)  # the last layer's output, the norm's saved tensors
        if not sp.family.lm_head:  # a classifier: the final norm's (N, d) output, unless it pools one token
            out = 0 if sp.family.pooled else n * sp.d * s.act
            return base + out, base + out + n * sp.d * s.act
        v = sp.vocab
        labels = n * 8
        if head == "fused":
            kept = base + n * sp.d * s.act + labels + 4 * n  # norm output (the op's input), labels, fp32 logsumexp
            return kept, kept + min(s.fused_chunk_bytes, 4 * n * v) + n * sp.d * s.act
        if head != "hf":
            raise ValueError(f"head must be 'hf' or 'fused', got {head!r}")
        weight_copy = v * sp.d * 2 if s.mm < s.act else 0
        logits = (s.mm if s.keep_logits else 0) * n * v
        kept = base + n * sp.d * s.mm + labels + weight_copy + logits + 4 * n * v
        return kept, kept + 8 * n * v

    # ---- a whole strategy
    def step(self, kinds: tuple[str, ...], head: str, batch: int, seq: int) -> tuple[int, int]:
        """(activation bytes kept after forward, activation peak of the step) for per-layer ``kinds``."""
        embed = self.embed_bytes(kinds, batch, seq)
        kept = {k: self.layer_bytes(k, batch, seq) for k in set(kinds)}
        peak = {k: self.layer_peak(k, batch, seq) for k in set(kinds)}
        head_kept, head_peak = self.head_bytes(head, batch, seq)
        layers = sum(kept[k] for k in kinds)
        before, layer_phase = 0, 0
        for k in kinds:
            layer_phase = max(layer_phase, before + peak[k])
            before += kept[k]
        held = self.held_logits(head, batch, seq)  # the caller's outputs.logits outlive the head's backward
        forward = layers + kinds.count("checkpoint") * self.cached_copies() + self.head_forward(head, batch, seq)
        return embed + layers + head_kept, embed + max(forward, layers + head_peak, layer_phase + held)

    def cached_copies(self) -> int:
        """Autocast caches the 16-bit copy of every weight it casts until the forward leaves autocast: a torch-
        checkpointed layer saves none of them, yet they are alive at the end of the forward."""
        s = self.setup
        return 2 * self.spec.matmul_weights if s.mm < s.act else 0

    def head_forward(self, head: str, batch: int, seq: int) -> int:
        """Bytes of the head alive at the end of its forward: what it keeps, plus ForCausalLMLoss's fp32 copy of the
        logits (logits.float()) and the logits themselves when the caller does not hold them."""
        sp, s = self.spec, self.setup
        kept = self.head_bytes(head, batch, seq)[0]
        if head != "hf" or not sp.family.lm_head:
            return kept
        n = batch * seq
        return kept + n * sp.vocab * ((4 if s.mm != 4 else 0) + (0 if s.keep_logits else s.mm))

    def held_logits(self, head: str, batch: int, seq: int) -> int:
        sp, s = self.spec, self.setup
        if head != "hf" or not sp.family.lm_head or not s.keep_logits:
            return 0
        return batch * seq * sp.vocab * s.mm

    # ---- time
    def layer_seconds(self, kind: str, seq: int) -> float:
        from .planner_trace import layer_seconds

        s = self.setup
        return layer_seconds(self.spec.template, kind, seq, price_batch(seq), s.param_dtype, s.compute_dtype,
                             self._rope, self.spec.family.causal_mask)  # fmt: skip

    def head_seconds(self, head: str, seq: int) -> float:
        from .roofline import price

        sp, s = self.spec, self.setup
        if not sp.family.lm_head:
            return 0.0
        n, v, d = price_batch(seq) * seq, sp.vocab, sp.d
        matmul = price(2 * n * d * v, (n * d + v * d) * s.mm + n * v * (4 if head == "fused" else s.mm))
        if head == "fused":
            return 4 * matmul + price(0, 8 * n * v) + price(0, 12 * n * v)
        cast = 2 * price(0, n * v * (s.mm + 4)) if s.mm != 4 else 0.0
        return 3 * matmul + cast + price(0, 8 * n * v) + price(0, 4 * n * v) + price(0, 12 * n * v)

    def seconds(self, kinds: tuple[str, ...], head: str, seq: int) -> float:
        return sum(self.layer_seconds(k, seq) for k in kinds) + self.head_seconds(head, seq)


_SEQS = (64, 128, 192)


def _bilinear_quadratic(at, batch: int, seq: int) -> int:
    """f(batch, seq) from f at batch 1, 2 and seq 64, 128, 192, for f affine in the batch and quadratic in seq
    (Lagrange interpolation in exact integer arithmetic; f itself where the result is not an integer)."""
    from fractions import Fraction

    def in_seq(b: int) -> Fraction:
        total = Fraction(0)
        for i, ti in enumerate(_SEQS):
            weight = Fraction(1)
            for j, tj in enumerate(_SEQS):
                if j != i:
                    weight *= Fraction(seq - tj, ti - tj)
            total += weight * at(b, ti)
        return total

    one, two = in_seq(1), in_seq(2)
    value = one + (batch - 1) * (two - one)
    if value.denominator != 1:  # not of that form (some layer picks another path by size): trace the point itself
        return at(batch, seq)
    return int(value)


def price_batch(seq: int) -> int:
    return max(1, round(PRICE_TOKENS / seq))
