"""The memory model: the bytes one micro-batch of LoRA training (or one forward without gradients) keeps on the GPU
at its peak, term by term. Pure arithmetic on a model's sizes (`Shape`) and a step's settings (`Step`): no files,
no CUDA, no recipe, nothing imported beyond the standard library (a test checks it).

It follows what the installed software keeps (transformers 5.24, PEFT 0.21, bitsandbytes 0.50, TRL 1.16, as
llama-ft drives them):

* weights: NF4 + double quantisation is 4 + 8/64 + 32/(64*256) = 4.127 bits per quantised parameter (every
  attention and MLP projection); the embeddings, the output head and the norms are not quantised: llama-ft freezes
  them as loaded, in the compute dtype (ft/models.py freeze_as_loaded; Llama-2-7B: 3.11 GiB of NF4 projections +
  0.49 GiB of 16-bit embeddings and head = 3.87 GB), or with `upcast_frozen` (model.upcast_frozen: true, peft's
  prepare_model_for_kbit_training) in float32 (0.98 GiB: 4.09 GiB in all);
* the LoRA adapter, its gradients and the optimiser state (by train.optim), all float32;
* activations: what autograd saves per decoder layer and token. The residual stream has the embeddings' dtype:
  the compute dtype by default, so every checkpoint is 2 bytes x hidden per layer and token; float32 with
  `upcast_frozen` (4 bytes), and then the bitsandbytes layers return float32 too (their input dtype) and RoPE's
  cos and sin are float32. `layer_bytes` holds the count; a test checks it against the bytes autograd really saves
  on the CPU, for both settings (tests/test_plan.py);
* the LM head and loss: TRL 1.16's trainers (SFT, DPO) never build the (tokens x 32,000) logits: a fused,
  chunked log-prob kernel projects 4,096 tokens at a time and recomputes the tiles in the backward pass
  (trl/trainer/utils.py add_fused_lm_head, trl/kernels/chunked_logprob.py). That replaces the ~10 bytes x
  32,000 per token that transformers' own loss costs (logits upcast to float32, log-softmax saved, its
  gradient: transformers/loss/loss_utils.py ForCausalLMLoss). Where the logits are built (transformers' loss, PPO),
  they are float32 with either setting (ft/models.py float32_outputs);
* dequantisation buffers (bitsandbytes dequantises a whole weight for a matmul over more than 1,536 rows),
  the caching allocator's slack and the CUDA context;
* for generation, the KV cache of one sampling batch; for PPO, every adapter on the shared base.

Units: every `*_bytes` function returns bytes (an int). "Per token" means per token of the micro-batch
(`Step.tokens` = sequences x length); h is the hidden size, i the MLP's intermediate size, c the compute dtype's
bytes (2 for fp16/bf16, 4 for float32).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3

NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 absmax-of-absmax per 256 blocks
CUDA_CONTEXT = 512 * 1024**2  # bytes: CUDA context, cuBLAS workspace and loaded kernels (outside torch's allocator): ~0.3-0.6 GiB
ALLOCATOR_SLACK = 0.10  # caching allocator: reserved above allocated, as a fraction of the short-lived terms (assumption)
OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2,
                   "paged_adamw_8bit": 2}  # bytes per trainable parameter: two moments, fp32 or 8-bit blockwise
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_HEAD_TOKENS = 4096  # TRL's chunked log-prob kernel: tokens per projection tile (TOKEN_CHUNK_SIZE)
SHORT_LIVED = ("activations", "backward", "loss", "dequantization", "kv_cache")  # the terms the allocator's slack is on


# ---------------------------------------------------------------- the model's sizes


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-architecture model that memory and time depend on (counts, not bytes)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False
    head_dim: int | None = None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        """Parameters of all projections of all layers (what 4-bit quantisation applies to)."""
        return self.layers * sum(a * b for a, b in self.projections().values())

    def lora_params(self, targets, r: int) -> int:
        """Parameters of one LoRA adapter of rank r on `targets` in every layer (A: r x in, B: out x r)."""
        dims = self.projections()
        return self.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)

    def params(self) -> int:
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.linear_params() + self.vocab * self.hidden + head + (2 * self.layers + 1) * self.hidden


# ---------------------------------------------------------------- one step


@dataclass(frozen=True)
class Step:
    """One micro-batch of LoRA training (or, with train=False, one forward without gradients)."""

    shape: Shape
    sequences: int = 1  # sequences in the micro-batch
    length: int = 4096  # tokens per sequence
    quantization: str = "4bit"  # 4bit | 8bit | none: how the projections are stored
    compute_bytes: int = 2  # bytes per value of the compute dtype: 2 for fp16/bf16 autocast, 4 for float32
    upcast_frozen: bool = True  # a quantised base's embeddings, head and norms in float32 (model.upcast_frozen: true,
    # peft's prepare_model_for_kbit_training); False: in the compute dtype (llama-ft's default, Context.step)
    targets: tuple = ALL_TARGETS
    r: int = 16
    dropout: float = 0.05
    optim: str = "adamw_torch"
    checkpointing: bool = True
    masked: bool = True  # a (batch, 1, len, len) boolean attention mask: packing or padding
    head: str = "fused"  # fused: TRL's chunked log-probs | full: logits in fp32 | chunked16 | score | last | none
    train: bool = True
    trainable_extra: int = 0  # parameters trained in full besides LoRA (a reward model's score head)
    adapters: int = 1  # LoRA adapters on the base (trainable ones are `trainable_adapters` of them)
    trainable_adapters: int = 1
    bnb_saves_input: bool = False  # bitsandbytes <= 0.41 saved every 4-bit layer's input for the backward pass
    dropout_mask_bytes: int = 1  # bytes per mask value: CUDA's fused dropout keeps a bool mask (the CPU kernel a float)
    autocast: bool = True  # mixed precision: autocast keeps 16-bit copies of the float32 LoRA weights per layer

    @property
    def tokens(self) -> int:
        """Tokens in the micro-batch."""
        return self.sequences * self.length

    @property
    def residual_bytes(self) -> int:
        """Bytes per value of the residual stream: the embeddings' dtype (float32 when upcast, else the compute dtype)."""
        return 4 if self.upcast_frozen or self.compute_bytes == 4 else 2

    @property
    def linear_out_bytes(self) -> int:
        """Bytes per value a projection returns: bitsandbytes layers return their input's dtype (the residual's);
        nn.Linear under autocast, fp16/bf16."""
        return self.residual_bytes if self.quantization in ("4bit", "8bit") else self.compute_bytes

    @property
    def quantised(self) -> bool:
        return self.quantization in ("4bit", "8bit")


# ---------------------------------------------------------------- the terms


def weight_bytes(s: Step) -> dict[str, int]:
    """Bytes of the base model's weights: the (quantised) projections, and the rest (embeddings, output head, norms,
    a score head) in float32 when upcast, else in the compute dtype."""
    m = s.shape
    frozen_b = 4 if s.upcast_frozen or s.compute_bytes == 4 else s.compute_bytes
    quantised = m.linear_params()
    per_param = {"4bit": NF4_DQ_BITS / 8, "8bit": 1.0, "none": s.compute_bytes}[s.quantization]
    head = 0 if s.head in ("score",) or m.tie_embeddings else m.vocab * m.hidden
    other = m.vocab * m.hidden + head + (2 * m.layers + 1) * m.hidden + (m.hidden if s.head == "score" else 0)
    return {"quantised": int(quantised * per_param), "unquantised": other * frozen_b}


def trainable_params(s: Step) -> int:
    """Parameters that get gradients and optimiser state: the trainable adapters and any fully trained extra (0 for a
    forward without gradients)."""
    if not s.train:
        return 0
    return s.shape.lora_params(s.targets, s.r) * s.trainable_adapters + s.trainable_extra


def lora_bytes(s: Step) -> int:
    """Bytes of every LoRA adapter on the base (trained or frozen) and the extra trained parameters, float32."""
    return 4 * (s.shape.lora_params(s.targets, s.r) * s.adapters + s.trainable_extra)


def gradient_bytes(s: Step) -> int:
    """Bytes of the trainable parameters' gradients, float32."""
    return 4 * trainable_params(s)


def optimizer_bytes(s: Step) -> int:
    """Bytes of the optimiser state: OPTIMIZER_BYTES per trainable parameter (8 for an optimiser plan does not know)."""
    return OPTIMIZER_BYTES.get(s.optim, 8) * trainable_params(s)


def mask_bytes(s: Step) -> int:
    """Bytes of the boolean (batch, 1, len, len) attention mask, when there is one (SDPA's float copy is in
    `backward_bytes`)."""
    return s.sequences * s.length * s.length if s.masked else 0


def dequantization_bytes(s: Step) -> int:
    """Bytes of bitsandbytes' dequantised copy of the largest projection in the compute dtype: one in a forward,
    two during the backward pass."""
    if not s.quantised:
        return 0
    largest = max(a * b for a, b in s.shape.projections().values())
    return (2 if s.train else 1) * largest * s.compute_bytes


def layer_bytes(s: Step) -> int:
    """Bytes autograd saves per token in one decoder layer (HF Llama + PEFT LoRA + bitsandbytes), forward to backward.

    Two RMSNorms keep their float32 input (4h each) and rsqrt (4 each); attention keeps q and k after RoPE, v and
    the output in the compute dtype, plus a float32 log-sum-exp per head; the MLP keeps gate's output (SiLU input),
    SiLU's output and up's output in the linear layers' output dtype; each LoRA target keeps its input in the
    compute dtype (the cast for lora_A), a dropout mask, and lora_A's r outputs. The frozen 4-bit layers keep
    nothing (bitsandbytes 0.50 saves only the packed weight), unless `bnb_saves_input` (older bitsandbytes).
    """
    m, c, o, r = s.shape, s.compute_bytes, s.linear_out_bytes, s.residual_bytes
    h, i = m.hidden, m.intermediate
    # Grouped heads under a mask: transformers' SDPA path repeats k and v to every query head (repeat_kv); SDPA keeps
    # those copies unless autocast makes its own compact compute-dtype copies (float32 k and v: upcast_frozen)
    kv = m.q_dim if s.masked and not (s.autocast and o != c) else m.kv_dim
    total = 2 * (4 * h + 4)  # the two norms (a float32 copy of their input either way: Llama's RMSNorm)
    total += c * (m.q_dim + kv + kv + m.q_dim) + 4 * m.heads  # q, k, v, attention output; log-sum-exp
    total += 3 * o * i  # gate output, SiLU output, up output
    if s.bnb_saves_input:
        total += r * h + c * m.q_dim + r * h + o * i  # inputs of q/k/v (shared), o, gate/up (shared), down
    dims = m.projections()
    for t in s.targets:
        if t in dims:
            total += (c + (s.dropout_mask_bytes if s.dropout > 0 else 0)) * dims[t][0] + c * s.r
    return total


def lora_cast_bytes(s: Step) -> int:
    """Bytes per layer of autocast's fp16/bf16 copies of the float32 LoRA weights (0 in float32 or without autocast)."""
    c = s.compute_bytes
    return c * s.shape.lora_params(s.targets, s.r) // s.shape.layers if s.autocast and c < 4 else 0


def backward_buffer_bytes(s: Step) -> int:
    """Bytes per token of the gradients alive while the backward pass is inside one layer: the residual's incoming
    and outgoing gradient, and the MLP's (down's input gradient in the compute dtype; SiLU, gate and up gradients)."""
    m = s.shape
    return 2 * s.residual_bytes * m.hidden + (s.compute_bytes + 3 * s.linear_out_bytes) * m.intermediate


def rotary_bytes(s: Step) -> int:
    """Bytes of RoPE's cos and sin (in the residual stream's dtype, one value per token and head dimension each),
    shared by every layer."""
    return s.tokens * 2 * s.residual_bytes * (s.shape.q_dim // s.shape.heads)


def head_bytes(s: Step) -> tuple[int, int]:
    """Bytes of the output head and the loss: (saved for the backward pass, transient at the peak)."""
    m, T, c = s.shape, s.tokens, s.compute_bytes
    V, h = m.vocab, m.hidden
    if s.head == "fused":  # TRL 1.16: [4096 x V] tiles, the head weight cast once (a float32 head), the final
        # hidden states (residual dtype) and their gradient; the tiles' log-sum-exp statistics are float32
        tile = min(T, FUSED_HEAD_TOKENS) * (V * c + h * c)
        cast = V * h * c if (s.upcast_frozen and c < 4) else 0
        hidden = T * s.residual_bytes * h if s.train else 0
        return hidden, tile + cast + hidden
    if s.head == "full":  # transformers' ForCausalLMLoss: logits.float(), log-softmax kept, then its gradient
        return (T * 4 * V if s.train else 0), T * (6 if s.train else c + 4) * V
    if s.head == "chunked16":  # LitGPT 2023: chunked cross-entropy on 16-bit logits, no upcast
        return (T * 2 * V if s.train else 0), T * 4 * V
    if s.head == "score":  # a scalar head: the trainable score layer keeps its float32 input
        return (T * 4 * h if s.train else 0), T * 4 * h
    if s.head == "last":  # generation: logits of the last position only (logits_to_keep=1), float32 + softmax
        return 0, s.sequences * V * 4 * 3
    return 0, 0


def activation_bytes(s: Step) -> int:
    """Training: bytes kept from the forward pass for the backward pass: with checkpointing each layer's input
    (the residual), else every layer's `layer_bytes`; the final norm's float32 input, RoPE, the mask and the head's
    saved tensors. A forward without gradients: one layer's tensors at a time (the residual in and out, the MLP's
    three outputs) and the mask."""
    m, T = s.shape, s.tokens
    if not s.train:
        return T * (s.residual_bytes * m.hidden * 2 + 3 * s.linear_out_bytes * m.intermediate) + mask_bytes(s)
    if s.checkpointing:
        saved = T * m.layers * s.residual_bytes * m.hidden
    else:
        saved = T * m.layers * layer_bytes(s) + m.layers * lora_cast_bytes(s)
    final = T * (4 * m.hidden) + rotary_bytes(s)  # the final norm keeps its float32 input
    return saved + final + mask_bytes(s) + head_bytes(s)[0]


def backward_bytes(s: Step) -> int:
    """Training only: bytes alive only during the backward pass: with checkpointing, the one layer being recomputed
    (its `layer_bytes` and LoRA casts); the backward buffers of one layer; SDPA's copy of the mask in the compute
    dtype."""
    recomputed = s.tokens * layer_bytes(s) + lora_cast_bytes(s) if s.checkpointing else 0
    return recomputed + s.tokens * backward_buffer_bytes(s) + (s.compute_bytes * mask_bytes(s) if s.masked else 0)


def step_terms(s: Step) -> dict[str, int]:
    """Allocated bytes at the peak of one training step (the start of the backward pass), or of one forward without
    gradients, by term (allocator slack and CUDA context are added by `finish`)."""
    w = weight_bytes(s)
    terms = {
        "weights": w["quantised"] + w["unquantised"],
        "lora": lora_bytes(s),
        "gradients": gradient_bytes(s),
        "optimizer": optimizer_bytes(s),
        "activations": activation_bytes(s),
    }
    if s.train:
        terms["backward"] = backward_bytes(s)
    terms["loss"] = head_bytes(s)[1]
    terms["dequantization"] = dequantization_bytes(s)
    return terms


def kv_cache_bytes(shape: Shape, sequences: int, tokens: int, compute_bytes: int = 2) -> int:
    """Bytes of the KV cache of `sequences` sequences of `tokens` tokens: keys and values of every layer."""
    return 2 * shape.layers * shape.kv_dim * compute_bytes * sequences * tokens


def finish(terms: dict[str, int]) -> dict[str, int]:
    """Add the allocator's slack (on the short-lived terms) and the CUDA context; returns a new dict."""
    dynamic = sum(terms.get(k, 0) for k in SHORT_LIVED)
    return {**terms, "allocator": int(ALLOCATOR_SLACK * dynamic), "cuda_context": CUDA_CONTEXT}
