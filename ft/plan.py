"""`llama-ft plan`: will this recipe fit my GPU, and how long will it take? Answered from the recipe and the
model's config alone, before any download, without importing torch.

The memory model follows what the installed software actually keeps on the GPU (transformers 5.24, PEFT 0.21,
bitsandbytes 0.50, TRL 1.16, as llama-ft drives them), term by term:

* weights: NF4 + double quantisation is 4 + 8/64 + 32/(64*256) = 4.127 bits per quantised parameter (every
  attention and MLP projection); the embeddings, the output head and the norms are not quantised, and llama-ft's
  QLoRA path (peft's prepare_model_for_kbit_training) upcasts them to float32;
* the LoRA adapter, its gradients and the optimiser state (by train.optim), all float32;
* activations: what autograd saves per decoder layer and token. Because the norms and embeddings are float32,
  the residual stream is float32 and so is every checkpoint (4 bytes x hidden per layer and token), and the
  bitsandbytes layers return float32 too (their input dtype). `layer_bytes` holds the count; a test checks it
  against the bytes autograd really saves on the CPU (tests/test_plan.py);
* the LM head and loss: TRL 1.16's trainers (SFT, DPO) never build the (tokens x 32,000) logits: a fused,
  chunked log-prob kernel projects 4,096 tokens at a time and recomputes the tiles in the backward pass
  (trl/trainer/utils.py add_fused_lm_head, trl/kernels/chunked_logprob.py). That replaces the ~10 bytes x
  32,000 per token that transformers' own loss costs (logits upcast to float32, log-softmax saved, its
  gradient: transformers/loss/loss_utils.py ForCausalLMLoss);
* dequantisation buffers (bitsandbytes dequantises a whole weight for a matmul over more than 1,536 rows),
  the caching allocator's slack and the CUDA context;
* for generation stages, the KV cache of one sampling batch; for PPO, every adapter on the shared base.

Time: FLOPs per token of LoRA training (forward and the input-gradient half of the backward through the frozen
base, the small LoRA matmuls, attention, the LM head, plus one more forward with recomputation) divided by a
realistic fraction of the GPU's dense fp16/bf16 peak, taken from published measurements where there are some
(see GPUS). Every published figure used is cited where it is used.

A stage is a function `recipe -> phases` in STAGES; a phase is the memory of one part of the stage (sampling,
scoring, training). PPO and GAtt are modelled from the keys their stages will have (read defensively, with
getattr), so merging those stages only needs their names added to the recipe schema.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from ft.errors import UserError

GiB = 1024**3

# ---------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-architecture model that memory and time depend on."""

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
        dims = self.projections()
        return self.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)

    def params(self) -> int:
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.linear_params() + self.vocab * self.hidden + head + (2 * self.layers + 1) * self.hidden


# Llama 2's published shapes (the paper, Table 1 and Meta's params.json; see /work/shared/LLAMA2.md).
LLAMA2 = {
    "7b": Shape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),
    "13b": Shape(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824, vocab=32000),
    "70b": Shape(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=32000),
}
_LLAMA2_ID = re.compile(r"(?:meta-llama/)?llama-2-(7|13|70)b(?:-chat)?(?:-hf)?", re.IGNORECASE)


def hub_cache_file(repo_id: str, filename: str, kind: str = "models") -> Path | None:
    """A file of a Hub repo if it is already in the local Hugging Face cache (never downloads)."""
    root = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    repo = Path(root) / f"{kind}--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    order = [snapshots / ref.read_text().strip()] if ref.is_file() else []
    for snap in order + sorted(snapshots.iterdir()):
        if (snap / filename).is_file():
            return snap / filename
    return None


def shape_from_config(config: dict, where: str) -> Shape:
    try:
        heads = int(config["num_attention_heads"])
        return Shape(hidden=int(config["hidden_size"]), layers=int(config["num_hidden_layers"]), heads=heads,
                     kv_heads=int(config.get("num_key_value_heads") or heads),
                     intermediate=int(config["intermediate_size"]), vocab=int(config["vocab_size"]),
                     tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                     head_dim=config.get("head_dim"))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: not a Llama-style config (missing or bad {e})") from None


def model_shape(name: str) -> tuple[Shape, str]:
    """The model's shape and where it came from: a built-in Llama 2 config, a local config.json, the Hub cache.

    Never downloads: a Hub id whose config.json is not cached is a user error that says how to get it.
    """
    from ft import tiny

    match = _LLAMA2_ID.fullmatch(name.strip())
    if match:
        return LLAMA2[match.group(1) + "b"], f"built-in Llama-2-{match.group(1)}b config"
    if name == tiny.NAME:
        cached = tiny.cache_dir() / f"tiny-llama-2-v{tiny.VERSION}" / "config.json"
        if cached.is_file():
            return shape_from_config(json.loads(cached.read_text()), str(cached)), "built-in tiny model config"
        c = tiny.CONFIG
        return Shape(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                     kv_heads=c["num_key_value_heads"], intermediate=c["intermediate_size"], vocab=1024), \
            "built-in tiny model config"
    local = Path(name).expanduser()
    if local.is_dir():
        config = local / "config.json"
        if not config.is_file():
            raise UserError(f"model.name {name!r}: the folder has no config.json")
        return shape_from_config(_read_json(config), str(config)), f"{config}"
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model.name {name!r}: no such folder, and not a Hub id of the form owner/name")
    cached = hub_cache_file(name, "config.json")
    if cached is None:
        raise UserError(f"model.name {name!r}: its config.json is not in the local Hugging Face cache, and plan never "
                        f"downloads. Fetch just that file (a few KB) with `hf download {name} config.json`, or point "
                        "model.name at a local folder holding config.json (built in: meta-llama/Llama-2-7b/13b/70b)")
    return shape_from_config(_read_json(cached), str(cached)), "config.json from the Hub cache"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as JSON ({e})") from None


# ---------------------------------------------------------------- GPUs


@dataclass(frozen=True)
class GPU:
    key: str
    label: str
    memory: int  # bytes the CUDA driver reports as total (torch.cuda.get_device_properties().total_memory)
    tflops: float | None  # peak dense fp16/bf16 tensor-core TFLOPS (fp32 accumulate), from the vendor's sheet
    bf16: bool = True
    bandwidth: float | None = None  # GB/s
    utilisation: float | None = None  # realistic fraction of `tflops` for HF + bitsandbytes QLoRA training
    source: str = ""


def _gib(x: float) -> int:
    return int(x * GiB)


# Memory: what torch reports as total_memory; where a published run printed it, that figure (Unsloth's notebooks
# print `total_memory / 1024**3` as "Max memory": Tesla T4 14.748, NVIDIA L4 22.168, A100-SXM4-40GB 39.394-39.557),
# otherwise the nominal size less the ~1.5% the driver keeps (an estimate).
# Peak dense fp16/bf16 tensor TFLOPS (no sparsity): NVIDIA datasheets (T4 65 "mixed precision"; L4 121 (242
# sparse); A10 125; V100 SXM2 125; A100 312; H100 SXM 989; H200 989; L40S 362) and whitepapers (GA102: RTX 3090
# 71 with fp32 accumulate; AD102: RTX 4090 165.2 with fp32 accumulate). AWS publishes no separate tensor figure
# for its A10G; the A10's is used.
# Utilisation: the fraction of that peak HF + PEFT + bitsandbytes QLoRA training reaches on the FLOPs of
# `flops_per_token` (recomputation included), once the fixed per-micro-batch cost (`fixed_seconds`) is taken out.
# Two are derived from published measurements (the arithmetic is in tests/test_plan.py); the others are
# assumptions by analogy and say so:
#   T4 0.11: Unsloth's README (Dec 2023, "Performance comparisons on 1 Tesla T4 GPU", its Hugging Face baseline:
#     QLoRA of Llama 2 7B, bsz 2, ga 4, adamw_8bit): Alpaca (51,760 rows) in 23 h 15 m for one epoch, 3.23 s per
#     micro-batch of 2 rows. At ~250 tokens per row (Alpaca prompt template + answer, padded in pairs: our
#     estimate) and 40.5 GFLOP per token with recomputation, less 0.44 s of fixed cost: 7.2 TFLOPS, 11% of 65.
#   A100 0.35: LLaMA-Factory's comparison with Unsloth (README, Dec 2023): Hugging Face 4-bit QLoRA of Llama 2 7B
#     on one A100, batch 4, cutoff 1,024, LoRA rank 8 (q, v), gradient checkpointing (its default): 2,415
#     tokens/s, i.e. 1.70 s per 4,096-token micro-batch; at 41.8 GFLOP per token, less 0.13 s fixed: 35% of 312.
GPUS: dict[str, GPU] = {g.key: g for g in [
    GPU("t4", "NVIDIA T4 16 GB", _gib(14.748), 65, bf16=False, bandwidth=320, utilisation=0.11,
        source="derived from Unsloth's Hugging Face baseline on a T4"),
    GPU("l4", "NVIDIA L4 24 GB", _gib(22.168), 121, bandwidth=300, utilisation=0.15,
        source="assumed: a 72 W card, power-limited like the T4"),
    GPU("a10g", "NVIDIA A10G 24 GB", _gib(22.1), 125, bandwidth=600, utilisation=0.25, source="assumed"),
    GPU("v100", "NVIDIA V100 16 GB", _gib(15.77), 125, bf16=False, bandwidth=900, utilisation=0.25,
        source="assumed"),
    GPU("v100-32g", "NVIDIA V100 32 GB", _gib(31.74), 125, bf16=False, bandwidth=900, utilisation=0.25,
        source="assumed"),
    GPU("rtx3090", "NVIDIA RTX 3090 24 GB", _gib(23.69), 71, bandwidth=936, utilisation=0.30, source="assumed"),
    GPU("rtx4090", "NVIDIA RTX 4090 24 GB", _gib(23.65), 165.2, bandwidth=1008, utilisation=0.25,
        source="assumed"),
    GPU("a100-40g", "NVIDIA A100 40 GB", _gib(39.39), 312, bandwidth=1555, utilisation=0.35,
        source="derived from LLaMA-Factory's Hugging Face QLoRA figure on an A100"),
    GPU("l40s", "NVIDIA L40S 48 GB", _gib(44.4), 362, bandwidth=864, utilisation=0.20, source="assumed"),
    GPU("a100-80g", "NVIDIA A100 80 GB", _gib(79.15), 312, bandwidth=2039, utilisation=0.35,
        source="as the A100 40 GB"),
    GPU("h100", "NVIDIA H100 SXM 80 GB", _gib(79.1), 989, bandwidth=3350, utilisation=0.20,
        source="assumed: bitsandbytes dequantisation and Python overheads do not scale with Hopper's tensor cores"),
    GPU("h200", "NVIDIA H200 141 GB", _gib(139.8), 989, bandwidth=4800, utilisation=0.20, source="as the H100"),
]}


def parse_gpu(text: str) -> GPU:
    """--gpu: a known name (t4, a100-80g, ...) or a plain number of GiB (memory only: no time estimate)."""
    key = text.strip().lower().replace("_", "-").removeprefix("nvidia-").replace("gb", "g")
    key = {"a100": "a100-40g", "a100-40": "a100-40g", "a100-80": "a100-80g", "v100-16g": "v100", "h100-80g": "h100",
           "3090": "rtx3090", "4090": "rtx4090", "rtx-3090": "rtx3090", "rtx-4090": "rtx4090"}.get(key, key)
    if key in GPUS:
        return GPUS[key]
    try:
        gib = float(text.strip().lower().removesuffix("gib").removesuffix("gb"))
    except ValueError:
        gib = None
    if gib is None or not 0 < gib < 10_000:
        raise UserError(f"--gpu {text}: unknown GPU; give one of {', '.join(GPUS)}, or its memory in GiB (e.g. --gpu 24)")
    return GPU(f"{gib:g}gib", f"a GPU with {gib:g} GiB", _gib(gib), None, source="memory only")


# ---------------------------------------------------------------- memory of one training step

NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 absmax-of-absmax per 256 blocks
CUDA_CONTEXT = 512 * 1024**2  # CUDA context, cuBLAS workspace and loaded kernels (outside torch's allocator): ~0.3-0.6 GiB
ALLOCATOR_SLACK = 0.10  # caching allocator: reserved above allocated for the step's short-lived tensors (assumption)
OPTIMIZER_BYTES = {"adamw_torch": 8, "adamw_torch_fused": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2,
                   "paged_adamw_8bit": 2}  # two moments per trainable parameter: fp32, or 8-bit blockwise
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_HEAD_TOKENS = 4096  # TRL's chunked log-prob kernel: tokens per projection tile (TOKEN_CHUNK_SIZE)


@dataclass(frozen=True)
class Step:
    """One micro-batch of LoRA training (or, with train=False, one forward without gradients)."""

    shape: Shape
    sequences: int = 1  # sequences in the micro-batch
    length: int = 4096  # tokens per sequence
    quantization: str = "4bit"
    compute_bytes: int = 2  # 2: fp16/bf16 autocast; 4: float32
    upcast_frozen: bool = True  # embeddings, head and norms in float32 (peft's prepare_model_for_kbit_training)
    targets: tuple = ALL_TARGETS
    r: int = 16
    dropout: float = 0.05
    optim: str = "adamw_torch"
    checkpointing: bool = True
    masked: bool = True  # a (batch, 1, len, len) boolean attention mask: packing or padding
    head: str = "fused"  # fused: TRL's chunked log-probs | full: logits in fp32 | chunked16 | score | none
    train: bool = True
    trainable_extra: int = 0  # trained in full besides LoRA (a reward model's score head)
    adapters: int = 1  # LoRA adapters on the base (trainable ones are `trainable_adapters` of them)
    trainable_adapters: int = 1
    bnb_saves_input: bool = False  # bitsandbytes <= 0.41 saved every 4-bit layer's input for the backward pass
    dropout_mask_bytes: int = 1  # CUDA's fused dropout keeps a bool mask (the CPU kernel keeps a float one)
    autocast: bool = True  # mixed precision: autocast keeps 16-bit copies of the float32 LoRA weights per layer

    @property
    def tokens(self) -> int:
        return self.sequences * self.length

    @property
    def residual_bytes(self) -> int:
        """The residual stream: float32 when the embeddings and norms are (llama-ft's QLoRA path)."""
        return 4 if self.upcast_frozen or self.compute_bytes == 4 else 2

    @property
    def linear_out_bytes(self) -> int:
        """bitsandbytes layers return their input's dtype (the residual's); nn.Linear under autocast, fp16/bf16."""
        return self.residual_bytes if self.quantization in ("4bit", "8bit") else self.compute_bytes


def layer_bytes(s: Step) -> int:
    """Bytes autograd saves per token in one decoder layer (HF Llama + PEFT LoRA + bitsandbytes), forward to backward.

    Two RMSNorms keep their float32 input (4h each) and rsqrt (4 each); attention keeps q and k after RoPE, v and
    the output in the compute dtype, plus a float32 log-sum-exp per head; the MLP keeps gate's output (SiLU input),
    SiLU's output and up's output in the linear layers' output dtype; each LoRA target keeps its input in the
    compute dtype (the cast for lora_A), a dropout mask, and lora_A's r outputs. The frozen 4-bit layers keep
    nothing (bitsandbytes 0.50 saves only the packed weight), unless `bnb_saves_input` (older bitsandbytes).
    """
    m, c, o, r = s.shape, s.compute_bytes, s.linear_out_bytes, s.residual_bytes
    h, i, kv = m.hidden, m.intermediate, m.kv_dim
    total = 2 * (4 * h + 4)  # the two norms
    total += c * (m.q_dim + kv + kv + m.q_dim) + 4 * m.heads  # q, k, v, attention output; log-sum-exp
    total += 3 * o * i  # gate output, SiLU output, up output
    if s.bnb_saves_input:
        total += r * h + c * m.q_dim + r * h + o * i  # inputs of q/k/v (shared), o, gate/up (shared), down
    dims = m.projections()
    for t in s.targets:
        if t in dims:
            total += (c + (s.dropout_mask_bytes if s.dropout > 0 else 0)) * dims[t][0] + c * s.r
    return total


def backward_buffer_bytes(s: Step) -> int:
    """Per token, the gradients alive while the backward pass is inside one layer: the residual's incoming and
    outgoing gradient, and the MLP's (down's input gradient in the compute dtype; SiLU, gate and up gradients)."""
    m = s.shape
    return 2 * s.residual_bytes * m.hidden + (s.compute_bytes + 3 * s.linear_out_bytes) * m.intermediate


def weight_bytes(s: Step) -> dict[str, int]:
    m = s.shape
    frozen_b = 4 if s.upcast_frozen or s.compute_bytes == 4 else s.compute_bytes
    quantised = m.linear_params()
    per_param = {"4bit": NF4_DQ_BITS / 8, "8bit": 1.0, "none": s.compute_bytes}[s.quantization]
    head = 0 if s.head in ("score",) or m.tie_embeddings else m.vocab * m.hidden
    other = m.vocab * m.hidden + head + (2 * m.layers + 1) * m.hidden + (m.hidden if s.head == "score" else 0)
    return {"quantised": int(quantised * per_param), "unquantised": other * frozen_b}


def step_terms(s: Step) -> dict[str, int]:
    """Allocated bytes at the peak of one training step (the start of the backward pass), by term."""
    m = s.shape
    w = weight_bytes(s)
    lora = m.lora_params(s.targets, s.r)
    trainable = (lora * s.trainable_adapters + s.trainable_extra) if s.train else 0
    terms = {
        "weights": w["quantised"] + w["unquantised"],
        "lora": 4 * (lora * s.adapters + s.trainable_extra),
        "gradients": 4 * trainable,
        "optimizer": OPTIMIZER_BYTES.get(s.optim, 8) * trainable,
    }
    T, c = s.tokens, s.compute_bytes
    largest = max(a * b for a, b in m.projections().values())
    dequant = (2 if s.train else 1) * largest * c if s.quantization in ("4bit", "8bit") else 0
    mask = s.sequences * s.length * s.length if s.masked else 0  # bool; SDPA's float copy counted below
    if not s.train:  # no autograd graph: one layer's tensors at a time
        terms["activations"] = T * (s.residual_bytes * m.hidden * 2 + 3 * s.linear_out_bytes * m.intermediate) + mask
        terms["loss"] = _head_bytes(s)[1]
        terms["dequantization"] = dequant
        return terms
    rotary = T * 2 * 4 * (m.q_dim // m.heads)  # cos and sin (float32), shared by every layer
    final = T * (4 * m.hidden) + rotary  # the final norm keeps its float32 input
    per_layer = layer_bytes(s)
    copies = c * lora // m.layers if s.autocast and c < 4 else 0  # per layer: autocast's casts of the LoRA weights
    if s.checkpointing:  # each layer keeps only its input; the backward pass recomputes one layer at a time
        saved = T * m.layers * s.residual_bytes * m.hidden
        recomputed = T * per_layer + copies
    else:
        saved, recomputed = T * m.layers * per_layer + m.layers * copies, 0
    head_saved, head_transient = _head_bytes(s)
    terms["activations"] = saved + final + mask + head_saved
    terms["backward"] = recomputed + T * backward_buffer_bytes(s) + (c * mask if s.masked else 0)
    terms["loss"] = head_transient
    terms["dequantization"] = dequant
    return terms


def _head_bytes(s: Step) -> tuple[int, int]:
    """(saved for backward, transient at the peak) of the output head and the loss."""
    m, T, c = s.shape, s.tokens, s.compute_bytes
    V, h = m.vocab, m.hidden
    if s.head == "fused":  # TRL 1.16: [4096 x V] tiles, the head weight cast once, float32 hidden and its gradient
        tile = min(T, FUSED_HEAD_TOKENS) * (V * c + h * c)
        cast = V * h * c if (s.upcast_frozen and c < 4) else 0
        return (T * 4 * h if s.train else 0), tile + cast + (T * 4 * h if s.train else 0)
    if s.head == "full":  # transformers' ForCausalLMLoss: logits.float(), log-softmax kept, then its gradient
        return (T * 4 * V if s.train else 0), T * (6 if s.train else c + 4) * V
    if s.head == "chunked16":  # LitGPT 2023: chunked cross-entropy on 16-bit logits, no upcast
        return (T * 2 * V if s.train else 0), T * 4 * V
    if s.head == "score":  # a scalar head: the trainable score layer keeps its float32 input
        return (T * 4 * h if s.train else 0), T * 4 * h
    if s.head == "last":  # generation: logits of the last position only (logits_to_keep=1), float32 + softmax
        return 0, s.sequences * V * 4 * 3
    return 0, 0


def kv_cache_bytes(shape: Shape, sequences: int, tokens: int, compute_bytes: int = 2) -> int:
    return 2 * shape.layers * shape.kv_dim * compute_bytes * sequences * tokens


def finish(terms: dict[str, int]) -> dict[str, int]:
    """Add the allocator's slack (on the short-lived terms) and the CUDA context; returns a new dict."""
    dynamic = sum(terms.get(k, 0) for k in ("activations", "backward", "loss", "dequantization", "kv_cache"))
    return {**terms, "allocator": int(ALLOCATOR_SLACK * dynamic), "cuda_context": CUDA_CONTEXT}


# ---------------------------------------------------------------- FLOPs


def flops_per_token(s: Step, *, recompute: bool | None = None) -> float:
    """FLOPs per token of a training step (forward + backward [+ recomputed forward]) or of a forward (train=False).

    The frozen base costs 2N forward and 2N backward (input gradients only: no weight gradient); LoRA 2 forward,
    4 backward per adapter parameter; attention 4 * context * hidden per layer forward, twice that backward, with
    the full context under an explicit mask (SDPA's masked kernels compute every tile), half of it when causal;
    the fused head 2*h*V forward, 4*h*V backward (the tiles are recomputed).
    """
    m = s.shape
    n = m.linear_params()
    lora = m.lora_params(s.targets, s.r) * s.trainable_adapters
    context = s.length if s.masked else s.length / 2
    attention = 4 * context * m.q_dim * m.layers
    head = 0 if s.head in ("score", "none") else 2 * m.hidden * m.vocab
    forward = 2 * n + 2 * lora + attention + head
    if not s.train:
        return forward
    backward = 2 * n + 4 * lora + 2 * attention + 2 * head
    recompute = s.checkpointing if recompute is None else recompute
    return forward + backward + (2 * n + 2 * lora + attention if recompute else 0)


LAUNCH_SECONDS = 0.5e-3  # per layer and pass: kernel launches and Python in HF + PEFT + bitsandbytes (assumption)


def fixed_seconds(s: Step, gpu: GPU) -> float:
    """Per micro-batch, whatever its length: bitsandbytes dequantises every weight in each pass (read the packed
    weight, write and read back the 16-bit copy), at ~70% of the memory bandwidth; plus launch overheads."""
    passes = 1 if not s.train else (3 if s.checkpointing else 2)
    seconds = passes * s.shape.layers * LAUNCH_SECONDS
    if s.quantization in ("4bit", "8bit") and gpu.bandwidth:
        per_param = (NF4_DQ_BITS / 8 if s.quantization == "4bit" else 1) + 2 * s.compute_bytes
        seconds += passes * s.shape.linear_params() * per_param / (gpu.bandwidth * 1e9 * 0.7)
    return seconds


# ---------------------------------------------------------------- data sizes


@dataclass
class DataSize:
    rows: int | None  # examples (dialogs, pairs or prompts)
    tokens: float | None  # mean tokens of one training sequence (a dialog; prompt + one answer for pairs)
    prompt_tokens: float | None = None  # mean prompt tokens (pairs, prompts)
    method: str = "unknown"  # how it was measured: tokenizer, bytes, declared, unknown
    source: str = ""

    def describe(self) -> str:
        if self.rows is None:
            return f"{self.source}: size unknown"
        text = f"{self.source}: {self.rows:,} rows"
        if self.tokens:
            text += f", ~{self.tokens:,.0f} tokens each"
        return text + f" ({self.method})"


# Declared sizes of the Hub datasets the shipped recipes use (their dataset cards) and typical lengths.
# UltraChat: 1,467 tokens per dialogue on average (Ding et al. 2023, "Enhancing Chat Language Models by Scaling
# High-quality Instructional Conversations", Table 1). HH-RLHF: ~250 tokens per transcript is our estimate from
# its mean transcript length (~1,000 characters at ~3.7 characters per token); the prompt is most of it.
HUB_DATASETS = {
    "huggingfaceh4/ultrachat_200k": {
        "rows": {"train_sft": 207_865, "test_sft": 23_110, "train_gen": 256_032, "test_gen": 28_304},
        "tokens": 1467, "prompt_tokens": 300,
        "source": "split sizes from the dataset card; 1,467 tokens per dialogue from the UltraChat paper"},
    "anthropic/hh-rlhf": {
        "rows": {"helpful-base/train": 43_835, "helpful-base/test": 2_354, "harmless-base/train": 42_537,
                 "harmless-base/test": 2_312, "train": 160_800, "test": 8_552},
        "tokens": 250, "prompt_tokens": 170,
        "source": "split sizes from the dataset card; ~250 tokens per transcript (our estimate)"},
}
CHARS_PER_TOKEN = 3.7  # English prose with Llama 2's SentencePiece tokenizer (an estimate, for counting by bytes)
TURN_OVERHEAD = 12  # <s>[INST] ... [/INST] ... </s> per turn, in tokens


def _split_rows(split: str, declared: dict, prefix: str = "") -> int | None:
    total = 0
    for part in split.split("+"):
        m = re.fullmatch(r"\s*([\w.-]+)\s*(?:\[\s*(-?\d*%?)\s*:\s*(-?\d*%?)\s*\])?\s*", part)
        if not m or (prefix + m.group(1)) not in declared:
            return None
        n = declared[prefix + m.group(1)]

        def at(text, default):
            if not text:
                return default
            value = n * int(text[:-1]) // 100 if text.endswith("%") else int(text)
            return max(0, min(n, value if value >= 0 else n + value))

        total += max(0, at(m.group(3), n) - at(m.group(2), 0))
    return total


def _datasets_cache_rows(path: str, split: str) -> int | None:
    """Declared split sizes of a Hub dataset already in the local `datasets` cache (dataset_info.json)."""
    root = Path(os.environ.get("HF_DATASETS_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "datasets"))
    folder = root / path.replace("/", "___")
    if not folder.is_dir():
        return None
    for info in folder.glob("**/dataset_info.json"):
        try:
            splits = {k: v["num_examples"] for k, v in json.loads(info.read_text()).get("splits", {}).items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        rows = _split_rows(split, splits)
        if rows is not None:
            return rows
    return None


def data_size(sources, *, kind: str, tokenizer_file: Path | None) -> DataSize:
    """Rows and mean tokens of the training data. kind: dialogs | pairs | prompts."""
    parts = [_source_size(src, kind, tokenizer_file) for src in sources]
    if any(p.rows is None for p in parts):
        unknown = [p for p in parts if p.rows is None]
        return DataSize(None, None, source=", ".join(p.source for p in unknown))
    rows = sum(p.rows for p in parts)
    known = [p for p in parts if p.tokens]
    mean = sum(p.tokens * p.rows for p in known) / max(sum(p.rows for p in known), 1) if known else None
    prompt = [p for p in parts if p.prompt_tokens]
    mean_prompt = sum(p.prompt_tokens * p.rows for p in prompt) / max(sum(p.rows for p in prompt), 1) if prompt else None
    methods = sorted({p.method for p in parts})
    return DataSize(rows, mean, mean_prompt, " + ".join(methods), " + ".join(p.source for p in parts))


def _source_size(src, kind: str, tokenizer_file: Path | None) -> DataSize:
    path = Path(src.path).expanduser()
    if path.exists():
        return _local_size(path, src, kind, tokenizer_file)
    name = f"{src.path}[{src.split}]"
    declared = HUB_DATASETS.get(src.path.lower())
    rows = _datasets_cache_rows(src.path, src.split)
    if rows is None and declared:
        rows = _split_rows(src.split, declared["rows"], prefix=f"{src.data_dir}/" if src.data_dir else "")
    if rows is None:
        return DataSize(None, None, source=name)
    tokens = declared["tokens"] if declared else None
    return DataSize(rows, tokens, declared["prompt_tokens"] if declared else None,
                    "declared size" + (f"; {declared['source']}" if declared else ""), name)


SAMPLE_ROWS = 2000  # rows tokenized per local file (the rest extrapolated), to answer in well under two seconds


def _local_size(path: Path, src, kind: str, tokenizer_file: Path | None) -> DataSize:
    from ft import data

    if path.suffix.lower() not in (".jsonl", ".json"):  # parquet/csv: rows by bytes only
        return DataSize(None, None, source=f"{path} (only .jsonl/.json files are sized)")
    try:
        rows, total = _sample_rows(path, src)
    except UserError:
        return DataSize(None, None, source=str(path))
    texts, prompts, fmt = [], [], None
    for row in rows:
        try:
            if kind == "dialogs":
                fmt = fmt or (src.format if src.format != "auto" else data.detect_format(row))
                messages = data.to_messages(row, fmt)
                texts.append(([m["content"] for m in messages], len(messages)))
            elif kind == "pairs":
                pair = data.to_pair(row)
                prompt = [m["content"] for m in pair["prompt"]]
                texts.append((prompt + [pair["chosen"]], len(pair["prompt"]) + 1))
                texts.append((prompt + [pair["rejected"]], len(pair["prompt"]) + 1))
                prompts.append((prompt, len(prompt)))
            else:
                prompt = [m["content"] for m in data.to_prompt(row)["prompt"]]
                texts.append((prompt, len(prompt)))
                prompts.append((prompt, len(prompt)))
        except data.RowError:
            continue
    if not texts:
        return DataSize(total, None, source=str(path))
    count, method = _counter(tokenizer_file)
    mean = sum(count(parts, turns) for parts, turns in texts) / len(texts)
    mean_prompt = sum(count(parts, turns) for parts, turns in prompts) / len(prompts) if prompts else None
    if kind == "prompts":
        mean_prompt = mean
    sampled = f", {len(rows):,} of the rows sampled" if total > len(rows) else ""
    return DataSize(total, mean, mean_prompt, method + sampled, str(path))


def _sample_rows(path: Path, src) -> tuple[list, int]:
    """The first SAMPLE_ROWS rows of a local JSON Lines or JSON file, and how many rows it has (JSON Lines are
    counted without parsing past the sample, so a large file is sized quickly)."""
    from ft import data

    if path.suffix.lower() == ".jsonl" or data._looks_like_lines(path):
        rows, total = [], 0
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                total += 1
                if len(rows) < SAMPLE_ROWS:
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        pass
        return rows, total
    every, _ = data.read_rows(src)
    return [row for _, row in every[:SAMPLE_ROWS]], len(every)


def _counter(tokenizer_file: Path | None):
    """count(list of texts, turns) -> tokens, with the model's tokenizer if it is on disk, else from characters."""
    if tokenizer_file is not None:
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tokenizer_file))
            overhead = len(tok.encode("[INST]  [/INST]", add_special_tokens=False).ids) + 2

            def count(parts, turns):
                return sum(len(e.ids) for e in tok.encode_batch(parts, add_special_tokens=False)) + overhead * math.ceil(turns / 2)

            return count, "counted with the model's tokenizer"
        except Exception:  # a tokenizer.json the installed `tokenizers` cannot read: fall back to characters
            pass

    def estimate(parts, turns):
        return sum(len(p) for p in parts) / CHARS_PER_TOKEN + TURN_OVERHEAD * math.ceil(turns / 2)

    return estimate, f"estimated from characters (~{CHARS_PER_TOKEN} per token)"


def tokenizer_file(recipe) -> Path | None:
    """tokenizer.json of the recipe's model if it is on disk: a run folder, a local model, the tiny model, the Hub cache."""
    from ft import tiny

    candidates = []
    if recipe.model.adapter:
        candidates.append(Path(recipe.model.adapter).expanduser() / "tokenizer.json")
    name = recipe.model.name
    if name == tiny.NAME:
        candidates.append(tiny.cache_dir() / f"tiny-llama-2-v{tiny.VERSION}" / "tokenizer.json")
    elif Path(name).expanduser().is_dir():
        candidates.append(Path(name).expanduser() / "tokenizer.json")
    elif name.count("/") == 1:
        cached = hub_cache_file(name, "tokenizer.json")
        if cached:
            candidates.append(cached)
    return next((c for c in candidates if c.is_file()), None)


# ---------------------------------------------------------------- stages -> phases


@dataclass
class Phase:
    name: str
    terms: dict[str, int]  # allocated bytes by term (allocator slack and CUDA context added by finish())
    seconds: float | None = None
    flops_per_token: float | None = None
    note: str = ""
    step: Step | None = None  # the training step, for the report


@dataclass
class Context:
    """What every stage function gets: the recipe, the model shape, the GPU and the data size."""

    recipe: object
    shape: Shape
    gpu: GPU
    data: DataSize
    notes: list[str] = field(default_factory=list)
    schedule: dict = field(default_factory=dict)

    @property
    def compute_bytes(self) -> int:
        return 4 if self.recipe.model.dtype == "float32" else 2

    def lora(self) -> tuple[tuple, int]:
        """(targets, rank) of the adapter being trained: the starting run's adapter if it is on disk, else lora:."""
        adapter = getattr(self.recipe.model, "adapter", None)
        config = Path(adapter).expanduser() / "adapter_config.json" if adapter else None
        if config is not None and config.is_file():
            try:
                cfg = json.loads(config.read_text())
                if isinstance(cfg["target_modules"], list):
                    return tuple(cfg["target_modules"]), int(cfg["r"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return tuple(self.recipe.lora.target_modules), self.recipe.lora.r

    def step(self, **changes) -> Step:
        targets, r = self.lora()
        t, q = self.recipe.train, self.recipe.model.quantization
        base = Step(shape=self.shape, sequences=t.batch_size, length=self.recipe.data.max_length, quantization=q,
                    compute_bytes=self.compute_bytes, upcast_frozen=q in ("4bit", "8bit"), targets=targets, r=r,
                    dropout=self.recipe.lora.dropout, optim=t.optim, checkpointing=t.gradient_checkpointing)
        return replace(base, **changes)

    def train_seconds(self, step: Step, tokens: float, micro_batch_tokens: float | None = None) -> float | None:
        """Compute time at the GPU's utilisation, plus a fixed cost per micro-batch (see fixed_seconds)."""
        if not self.gpu.tflops or not self.gpu.utilisation:
            return None
        micro_batches = tokens / max(micro_batch_tokens or step.tokens, 1)
        return (tokens * flops_per_token(step) / (self.gpu.tflops * 1e12 * self.gpu.utilisation)
                + micro_batches * fixed_seconds(step, self.gpu))

    def forward_seconds(self, step: Step, tokens: float) -> float | None:
        return self.train_seconds(replace(step, train=False), tokens)

    def generate_seconds(self, calls: int, new_tokens: int, sequences: int, prompt: float) -> float | None:
        """Sampling time: decoding is bound by Python overhead per layer and by reading the weights and the KV cache
        each step; the prompt's prefill is compute-bound. ~1 ms per layer and step is an assumption in the range of
        published Hugging Face generate() figures (LitGPT's resource tables, Oct 2023: Llama 2 7B nf4-dq decodes
        17.3 tokens/s on an A100, ~1.8 ms per layer, with the bitsandbytes of the time)."""
        if not self.gpu.tflops or not self.gpu.bandwidth:
            return None
        w = weight_bytes(self.step(train=False))
        kv = kv_cache_bytes(self.shape, sequences, int(prompt + new_tokens / 2), self.compute_bytes)
        per_token = self.shape.layers * 1e-3 + (w["quantised"] + w["unquantised"] + kv) / (self.gpu.bandwidth * 1e9 * 0.6)
        prefill = self.forward_seconds(self.step(sequences=sequences, length=int(prompt), masked=False),
                                       sequences * prompt) or 0
        return calls * (new_tokens * per_token + prefill)


def _packed(ctx: Context, rows: int | None, tokens: float | None, length: int) -> tuple[float | None, float | None]:
    """(sequences, mean tokens per sequence) of the training data, packed into `length` or one example per row."""
    if rows is None or not tokens:
        return None, None
    if ctx.recipe.data.packing:
        total = rows * min(tokens, length)
        return math.ceil(total / (0.98 * length)), length  # best-fit-decreasing packs are ~98% full
    return rows, min(tokens, length) * 1.06  # group_by_length: ~6% padding (README, "SFT throughput")


def schedule(ctx: Context, sequences: float | None, per_sequence: float | None, *, seq_per_example: int = 1) -> dict:
    """Tokens per optimiser step, steps per epoch, total steps and total tokens of a training run."""
    t = ctx.recipe.train
    per_step_seqs = t.batch_size * t.gradient_accumulation_steps
    out = {"sequences_per_step": per_step_seqs * seq_per_example, "tokens_per_step": None, "steps_per_epoch": None,
           "total_steps": t.max_steps, "total_tokens": None}
    if per_sequence:
        out["tokens_per_step"] = per_step_seqs * seq_per_example * per_sequence
    if sequences:
        out["steps_per_epoch"] = max(1, math.ceil(sequences / per_step_seqs))
        if t.max_steps is None:
            out["total_steps"] = max(1, math.ceil(t.epochs * out["steps_per_epoch"]))
    if out["total_steps"] and out["tokens_per_step"]:
        out["total_tokens"] = out["total_steps"] * out["tokens_per_step"]
    return out


def _train_phase(ctx: Context, name: str, step: Step, sched: dict, note: str = "", *, eval_kind: str | None = None,
                 eval_passes: int = 1) -> Phase:
    """The training phase: memory of one step, time of the whole run (plus evaluation over data.eval, if any)."""
    t = ctx.recipe.train
    seconds = None
    if sched.get("total_tokens"):
        micro = sched["tokens_per_step"] / t.gradient_accumulation_steps
        seconds = ctx.train_seconds(step, sched["total_tokens"], micro)
        if seconds is not None and ctx.recipe.data.eval and eval_kind:
            ev = data_size(ctx.recipe.data.eval, kind=eval_kind, tokenizer_file=tokenizer_file(ctx.recipe))
            if ev.rows and ev.tokens:
                every = t.eval_steps or t.save_steps
                evals = (sched["total_steps"] // every + 1) if eval_kind == "dialogs" or ctx.recipe.stage == "dpo" else 1
                eval_tokens = ev.rows * min(ev.tokens, ctx.recipe.data.max_length) * eval_passes
                seconds += evals * (ctx.forward_seconds(step, eval_tokens) or 0)
                ctx.notes.append(f"time includes {evals} evaluation pass{'es' if evals > 1 else ''} over data.eval "
                                 f"({ev.rows:,} rows)")
    return Phase(name, step_terms(step), seconds, flops_per_token(step), note, step)


def phases_sft(ctx: Context) -> list[Phase]:
    r = ctx.recipe
    seqs, per_seq = _packed(ctx, ctx.data.rows, ctx.data.tokens, r.data.max_length)
    length = r.data.max_length if r.data.packing else int(min(r.data.max_length, (per_seq or r.data.max_length) * 1.5))
    step = ctx.step(length=length, masked=r.data.packing or r.train.batch_size > 1)
    ctx.schedule = schedule(ctx, seqs, per_seq)
    phase = _train_phase(ctx, "train", step, ctx.schedule, eval_kind="dialogs")
    if not r.data.packing:
        ctx.notes.append(f"unpacked: memory sized at the longest batch ({length} tokens, 1.5x the mean, "
                         f"at most data.max_length)")
    return [phase]


def phases_reward(ctx: Context) -> list[Phase]:
    r = ctx.recipe
    mean = min(ctx.data.tokens or r.data.max_length, r.data.max_length)
    step = ctx.step(sequences=2 * r.train.batch_size, masked=True, head="score", trainable_extra=ctx.shape.hidden,
                    length=r.data.max_length)
    ctx.schedule = schedule(ctx, ctx.data.rows, mean * 1.06, seq_per_example=2)
    ctx.notes.append("reward: chosen and rejected go through in one batch (2 x train.batch_size sequences), "
                     "memory sized at data.max_length")
    return [_train_phase(ctx, "train", step, ctx.schedule, eval_kind="pairs", eval_passes=2)]


def phases_dpo(ctx: Context) -> list[Phase]:
    r = ctx.recipe
    mean = min(ctx.data.tokens or r.data.max_length, r.data.max_length)
    frozen = 1 if r.model.adapter else 0  # TRL loads a frozen copy of the starting adapter as the reference
    step = ctx.step(sequences=2 * r.train.batch_size, masked=True, adapters=1 + frozen, length=r.data.max_length)
    ctx.schedule = schedule(ctx, ctx.data.rows, mean * 1.06, seq_per_example=2)
    phase = _train_phase(ctx, "train", step, ctx.schedule, eval_kind="pairs", eval_passes=4)
    if phase.seconds is not None:  # plus the reference model's forward pass over the same tokens
        phase.seconds += ctx.forward_seconds(step, ctx.schedule["total_tokens"])
    ctx.notes.append("dpo: chosen and rejected in one batch; the reference pass (no gradients) is timed, "
                     "its memory is below the training step's")
    return [phase]


def _reward_runs(ctx: Context, folders) -> list[tuple[Shape, tuple, int]]:
    """(shape, targets, r) of each reward model run folder; the policy's shape and lora: where a folder is not there yet."""
    out = []
    for folder in folders:
        shape, (targets, rank) = ctx.shape, ctx.lora()
        cfg = Path(folder).expanduser() / "adapter_config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
                if isinstance(data["target_modules"], list):
                    targets, rank = tuple(data["target_modules"]), int(data["r"])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        else:
            ctx.notes.append(f"{folder}: not there yet; sized as the policy's base and LoRA")
        out.append((shape, targets, rank))
    return out


def _sampling_phase(ctx: Context, name: str, sequences: int, prompt: int, new_tokens: int, *, adapters: int = 1,
                    base_upcast: bool = False) -> Phase:
    step = ctx.step(sequences=sequences, length=prompt, train=False, head="last", masked=True,
                    upcast_frozen=base_upcast, adapters=adapters, trainable_adapters=0)
    terms = step_terms(step)
    terms["kv_cache"] = kv_cache_bytes(ctx.shape, sequences, prompt + new_tokens, ctx.compute_bytes)
    return Phase(name, terms, note=f"{sequences} sequences x ({prompt} prompt + {new_tokens} new) tokens")


def phases_rejection(ctx: Context) -> list[Phase]:
    r, cfg = ctx.recipe, ctx.recipe.rejection
    prompt_max = r.data.max_length  # prompts are not truncated: the recipe's max_length is the assumed bound
    sequences = cfg.batch_size * cfg.k
    phases = [_sampling_phase(ctx, "sample", sequences, prompt_max, cfg.max_new_tokens)]
    prompts = ctx.data.rows
    mean_prompt = ctx.data.prompt_tokens or ctx.data.tokens or prompt_max / 4
    if prompts and ctx.gpu.tflops:
        phases[0].seconds = ctx.generate_seconds(math.ceil(prompts / cfg.batch_size), cfg.max_new_tokens, sequences,
                                                 mean_prompt)
    scorers = [cfg.reward_model] + ([cfg.safety_model] if cfg.safety_model else [])
    for i, (shape, targets, rank) in enumerate(_reward_runs(ctx, scorers)):
        step = Step(shape=shape, sequences=8, length=prompt_max + cfg.max_new_tokens, quantization=r.model.quantization,
                    compute_bytes=ctx.compute_bytes, upcast_frozen=False, targets=targets, r=rank, train=False,
                    head="score", trainable_adapters=0)
        seconds = ctx.forward_seconds(step, prompts * cfg.k * (mean_prompt + cfg.max_new_tokens)) if prompts else None
        phases.append(Phase(f"score ({'safety' if i else 'reward'} model)", step_terms(step), seconds,
                            note="batches of 8 answers, no gradients"))
    answer = mean_prompt + cfg.max_new_tokens * 0.75
    seqs, per_seq = _packed(ctx, prompts, answer, r.data.max_length)
    step = ctx.step(length=r.data.max_length if r.data.packing else int(min(answer * 1.5, r.data.max_length)),
                    masked=True)
    ctx.schedule = schedule(ctx, seqs, per_seq)
    phases.append(_train_phase(ctx, "train (SFT on the best answers)", step, ctx.schedule))
    ctx.notes.append(f"rejection: prompts assumed at most data.max_length={prompt_max} tokens (the stage does not "
                     f"truncate them); answers timed at the full rejection.max_new_tokens={cfg.max_new_tokens}")
    return phases


def phases_ppo(ctx: Context) -> list[Phase]:
    """PPO/RLOO/GRPO on ONE 4-bit base: the policy adapter (trained), a frozen reference copy, a value adapter with a
    scalar head (trained; PPO only), one adapter + head per reward model. Keys read defensively: the ppo stage is
    merged separately."""
    r = ctx.recipe
    p = getattr(r, "ppo", None)
    algorithm = getattr(p, "algorithm", "ppo")
    rewards = list(getattr(p, "reward_models", None) or []) + ([p.safety_model] if getattr(p, "safety_model", None) else [])
    samples = int(getattr(p, "samples_per_prompt", 1) or 1)
    new = int(getattr(p, "max_new_tokens", 256) or 256)
    gen_batch = int(getattr(p, "generation_batch_size", None) or getattr(p, "batch_size", 8) or 8)
    prompts_per_iter = int(getattr(p, "batch_size", 64) or 64)
    mini = int(getattr(p, "mini_batch_size", None) or prompts_per_iter * samples)
    value = algorithm == "ppo"
    adapters = 2 + (1 if value else 0) + len(rewards)  # policy, reference, value, reward models
    trainable = 2 if value else 1
    length = r.data.max_length + new
    phases = [_sampling_phase(ctx, "sample", gen_batch * samples, r.data.max_length, new, adapters=adapters,
                              base_upcast=True)]
    step = ctx.step(length=length, masked=True, adapters=adapters, trainable_adapters=trainable,
                    trainable_extra=ctx.shape.hidden if value else 0)
    terms = step_terms(step)
    if value:  # ft/stages/ppo.py back-propagates the policy loss before the value forward: one graph alive at a time
        extra = step_terms(replace(step, head="score"))
        terms["activations"] = max(terms["activations"], extra["activations"])
    if algorithm == "ppo":  # the answer tokens' logits, upcast, log-softmax and its gradient (no fused head there)
        terms["loss"] = max(terms.get("loss", 0), r.train.batch_size * new * ctx.shape.vocab * 14)
    phases.append(Phase("train (policy" + (" + value" if value else "") + ")", terms,
                        flops_per_token=flops_per_token(step), step=step))
    prompts = ctx.data.rows
    iterations = r.train.max_steps or (math.ceil(r.train.epochs * prompts / prompts_per_iter) if prompts else None)
    if iterations and ctx.gpu.tflops:
        mean_prompt = ctx.data.prompt_tokens or ctx.data.tokens or r.data.max_length / 4
        tokens = iterations * prompts_per_iter * samples * (mean_prompt + new)
        gen = ctx.generate_seconds(iterations * math.ceil(prompts_per_iter / gen_batch), new, gen_batch * samples,
                                   mean_prompt)
        forwards = (1 + len(rewards) + (1 if value else 0)) * (ctx.forward_seconds(step, tokens) or 0)
        phases[0].seconds = gen
        phases[1].seconds = (ctx.train_seconds(step, tokens) or 0) * (2 if value else 1) + forwards
    ctx.schedule = {"sequences_per_step": mini, "tokens_per_step": mini * ((ctx.data.prompt_tokens or 0) + new),
                    "steps_per_epoch": None, "total_steps": iterations, "total_tokens": None}
    ctx.notes.append(f"{algorithm}: {adapters} adapters on one 4-bit base; sampling {gen_batch} x {samples} sequences "
                     f"per generate call; micro-batches of {r.train.batch_size} x {length} tokens"
                     + ("; the answer tokens' logits in float32 (14 bytes x vocab per answer token)" if algorithm == "ppo"
                        else "; log-probs through TRL's fused head"))
    return phases


def phases_gatt(ctx: Context) -> list[Phase]:
    """Ghost Attention: sample the answers of multi-turn dialogs (KV cache of gatt.batch_size dialogs), then the SFT
    stage trains on them at data.max_length. Keys read defensively: the gatt stage is merged separately."""
    r = ctx.recipe
    g = getattr(r, "gatt", None)
    batch = int(getattr(g, "batch_size", 4) or 4)
    new = int(getattr(g, "max_new_tokens", 256) or 256)
    turns = int(getattr(g, "max_turns", 4) or 4)
    phases = [_sampling_phase(ctx, "sample", batch, r.data.max_length, new)]
    dialogs = ctx.data.rows
    if dialogs and ctx.gpu.tflops:
        phases[0].seconds = ctx.generate_seconds(math.ceil(dialogs / batch) * turns, new, batch,
                                                 ctx.data.tokens or r.data.max_length / 2)
    phases += phases_sft(ctx)
    ctx.notes.append(f"gatt: {turns} turns sampled per dialog, {batch} dialogs per generate call")
    return phases


STAGES = {"sft": phases_sft, "reward": phases_reward, "dpo": phases_dpo, "rejection": phases_rejection,
          "ppo": phases_ppo, "gatt": phases_gatt}
DATA_KIND = {"sft": "dialogs", "gatt": "dialogs", "reward": "pairs", "dpo": "pairs", "rejection": "prompts",
             "ppo": "prompts"}


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    stage: str
    model: str
    model_source: str
    gpu: GPU
    phases: list[Phase]
    data: DataSize
    schedule: dict
    session_hours: float
    notes: list[str]
    advice: list[dict] = field(default_factory=list)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: sum(finish(p.terms).values()))

    @property
    def breakdown(self) -> dict[str, int]:
        return finish(self.peak_phase.terms)

    @property
    def peak_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu.memory

    @property
    def seconds(self) -> float | None:
        parts = [p.seconds for p in self.phases if p.name.startswith(("train", "sample", "score"))]
        return None if any(s is None for s in parts) or not parts else sum(parts)

    @property
    def hours(self) -> float | None:
        return None if self.seconds is None else self.seconds / 3600

    @property
    def sessions(self) -> int | None:
        return None if self.hours is None else max(1, math.ceil(self.hours / self.session_hours))

    def to_json(self) -> dict:
        phase = self.peak_phase
        train = next((p for p in self.phases if p.name.startswith("train")), phase)
        return {
            "stage": self.stage,
            "model": self.model,
            "model_config": self.model_source,
            "gpu": {"name": self.gpu.key, "label": self.gpu.label, "memory_bytes": self.gpu.memory,
                    "tflops": self.gpu.tflops, "utilisation": self.gpu.utilisation, "utilisation_source": self.gpu.source},
            "peak_bytes": self.peak_bytes,
            "gpu_bytes": self.gpu.memory,
            "fits": self.fits,
            "spare_bytes": self.gpu.memory - self.peak_bytes,
            "peak_phase": phase.name,
            "breakdown": self.breakdown,
            "phases": {p.name: {"peak_bytes": sum(finish(p.terms).values()), "breakdown": finish(p.terms),
                                "hours": None if p.seconds is None else p.seconds / 3600, "note": p.note}
                       for p in self.phases},
            "hours": self.hours,
            "time": {
                "data": {"rows": self.data.rows, "mean_tokens": self.data.tokens, "method": self.data.method,
                         "source": self.data.source},
                **self.schedule,
                "flops_per_token": train.flops_per_token,
                "session_hours": self.session_hours,
                "fits_session": None if self.hours is None else self.hours <= self.session_hours,
                "sessions": self.sessions,
                "resume_restarts": None if self.sessions is None else self.sessions - 1,
            },
            "advice": self.advice,
            "notes": self.notes,
        }


def make(recipe, gpu: GPU, *, session_hours: float = 12.0, advice: bool = True, skip: tuple = (),
         data: DataSize | None = None) -> Plan:
    """The plan of a validated recipe on a GPU. `skip`: phase-name prefixes to leave out (rejection --no-train)."""
    stage = recipe.stage
    if stage not in STAGES:
        raise UserError(f"stage {stage}: plan knows {', '.join(STAGES)}")
    shape, source = model_shape(recipe.model.name)
    if data is None:
        data = data_size(recipe.data.train, kind=DATA_KIND[stage], tokenizer_file=tokenizer_file(recipe))
    ctx = Context(recipe, shape, gpu, data)
    phases = [p for p in STAGES[stage](ctx) if not p.name.startswith(tuple(skip))]
    if recipe.model.quantization == "4bit" and recipe.train.optim.startswith("paged"):
        ctx.notes.append("paged optimisers can spill their state to CPU memory under pressure; counted as on the GPU")
    if data.rows is None:
        ctx.notes.append("training data size unknown: no time estimate (use a local file, a Hub dataset plan knows, "
                         "or train.max_steps)" if not recipe.train.max_steps else
                         "training data size unknown: time from train.max_steps")
    plan = Plan(stage, recipe.model.name, source, gpu, phases, data, ctx.schedule, session_hours, ctx.notes)
    if advice and not plan.fits:
        plan.advice = advise(recipe, gpu, plan, skip=skip)
    return plan


# ---------------------------------------------------------------- advice


def with_overrides(recipe, sets: list[str]):
    from ft import recipe as recipe_mod

    raw = recipe.model_dump(mode="json")
    for item in sets:
        recipe_mod.apply_override(raw, item)
    return recipe_mod.validate(raw, source="plan advice")


def _yaml(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def advise(recipe, gpu: GPU, plan: Plan, *, skip: tuple = ()) -> list[dict]:
    """The smallest changes that make the recipe fit, each with its new peak (fitting ones only, least intrusive
    first); if no single change fits, the cumulative combination."""
    t = recipe.train

    def attempt(change: str, sets: list[str], on: GPU = gpu):
        try:
            p = make(with_overrides(recipe, sets), on, advice=False, skip=skip, data=plan.data)
        except UserError:
            return None
        return {"change": change, "set": sets, "peak_bytes": p.peak_bytes, "gpu": on.key, "fits": p.fits}

    savers = []  # (description, --set list), in order of how little they change the training
    effective = t.batch_size * t.gradient_accumulation_steps
    for b in range(t.batch_size - 1, 0, -1):
        if effective % b == 0:
            savers.append((f"batch {b} x accumulation {effective // b} (same {effective} sequences per step)",
                           [f"train.batch_size={b}", f"train.gradient_accumulation_steps={effective // b}"]))
    if not t.gradient_checkpointing:
        savers.append(("gradient checkpointing on", ["train.gradient_checkpointing=true"]))
    if t.optim not in ("adamw_8bit", "paged_adamw_8bit"):
        savers.append(("8-bit paged AdamW", ["train.optim=paged_adamw_8bit"]))
    for section, key, floor in (("rejection", "batch_size", 1), ("ppo", "generation_batch_size", 1),
                                ("gatt", "batch_size", 1)):
        value = getattr(getattr(recipe, section, None), key, None)
        if recipe.stage == section and isinstance(value, int) and value > floor:
            for v in sorted({max(floor, value // 2 ** k) for k in range(1, 6)}, reverse=True):
                savers.append((f"{section}.{key} {v}", [f"{section}.{key}={v}"]))
    length = recipe.data.max_length
    for new in (3072, 2048, 1536, 1024, 768, 512, 256):
        if new < length:
            savers.append((f"sequences of {new} tokens", [f"data.max_length={new}"]))
    r = recipe.lora.r
    for new in (r // 2, r // 4, r // 8):
        if 4 <= new < r:
            alpha = max(1, recipe.lora.alpha * new // r)
            savers.append((f"LoRA rank {new} (alpha {alpha}, same scale)", [f"lora.r={new}", f"lora.alpha={alpha}"]))

    found, taken_keys = [], set()
    for change, sets in savers:
        key = sets[0].split("=")[0]
        if key in taken_keys:  # one suggestion per key: the mildest one that fits
            continue
        result = attempt(change, sets)
        if result and result["fits"]:
            found.append(result)
            taken_keys.add(key)
    if not found:  # nothing alone fits: add the changes one after the other (a later value of a key replaces an
        # earlier one), keeping each that lowers the peak, until it fits; then undo what is not needed
        chosen: dict[str, tuple[str, list[str]]] = {}  # first key of a change -> (description, --set list)
        current = plan.peak_bytes
        for change, more in savers:
            trial_chosen = {**chosen, more[0].split("=")[0]: (change, more)}
            trial = attempt(change, _flat(trial_chosen))
            if trial is None or trial["peak_bytes"] >= current:
                continue
            chosen, current = trial_chosen, trial["peak_bytes"]
            if trial["fits"]:
                found.append(_relax(attempt, savers, chosen, trial))
                break
    bigger = sorted((g for g in GPUS.values() if g.memory > gpu.memory),
                    key=lambda g: (round(g.memory / GiB), g.tflops or 0))  # equal memory: the slower, cheaper one
    for g in bigger:
        result = attempt(f"a bigger GPU: {g.label}", [], on=g)
        if result and result["fits"]:
            found.append({**result, "set": [], "gpu_flag": f"--gpu {g.key}"})
            break
    return found


def _flat(chosen: dict) -> list[str]:
    return [x for _, sets in chosen.values() for x in sets]


def _relax(attempt, savers, chosen: dict, fitting: dict) -> dict:
    """Undo as much of a fitting combination as still fits: drop a change, or take a milder value of it."""
    for key in list(chosen):
        options = [None] + [(c, m) for c, m in savers if m[0].split("=")[0] == key]
        for option in options:  # mildest first: no change at all, then the savers' order
            if option is not None and option[1] == chosen[key][1]:
                break
            trial_chosen = {k: v for k, v in chosen.items() if k != key}
            if option is not None:
                trial_chosen[key] = option
            trial = attempt("", _flat(trial_chosen))
            if trial and trial["fits"]:
                chosen, fitting = trial_chosen, trial
                break
    return {**fitting, "change": " + ".join(c for c, _ in chosen.values()), "set": _flat(chosen)}


# ---------------------------------------------------------------- text report

TERM_LABELS = {
    "weights": "weights",
    "lora": "LoRA adapter(s) (float32)",
    "gradients": "LoRA gradients (float32)",
    "optimizer": "optimizer state",
    "activations": "activations kept for backward",
    "backward": "recomputed layer + backward buffers",
    "loss": "LM head and loss",
    "kv_cache": "KV cache",
    "dequantization": "dequantisation buffers",
    "allocator": f"allocator slack ({ALLOCATOR_SLACK:.0%} of short-lived)",
    "cuda_context": "CUDA context",
}


def _g(n: float) -> str:
    return f"{n / GiB:.2f}"


def _n(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _flops(f: float) -> str:
    return f"{f / 1e9:.1f} GFLOP" if f >= 1e8 else f"{f / 1e6:.2f} MFLOP"


def render(plan: Plan, recipe, label: str) -> str:
    p, g = plan.peak_phase, plan.gpu
    s = Context(recipe, model_shape(recipe.model.name)[0], g, plan.data).step()
    lines = [f"llama-ft plan {label} on {g.key} ({g.label}: {g.memory / GiB:.1f} GiB"
             + (f", {g.tflops:g} TFLOPS fp16/bf16 dense" if g.tflops else "") + ")"]
    m = s.shape
    size = f"{m.params() / 1e9:.2f} B" if m.params() >= 1e8 else f"{m.params() / 1e6:.2f} M"
    lines.append(f"model    {plan.model} ({plan.model_source}): {size} parameters, {m.layers} layers, "
                 f"hidden {m.hidden}, {recipe.model.quantization}")
    targets, r = Context(recipe, m, g, plan.data).lora()
    dtype = recipe.model.dtype if recipe.model.dtype != "auto" else ("bfloat16" if g.bf16 and g.tflops else "float16")
    lines.append(f"training {plan.stage}: {dtype} compute, batch {recipe.train.batch_size} x {recipe.data.max_length} "
                 f"tokens{' (packed)' if recipe.data.packing and plan.stage in ('sft', 'gatt', 'rejection') else ''}, "
                 f"gradient checkpointing {'on' if recipe.train.gradient_checkpointing else 'off'}, LoRA r={r} on "
                 f"{len(targets)} projections ({m.lora_params(targets, r) / 1e6:.1f} M parameters), {recipe.train.optim}")
    lines.append("")
    lines.append(f"memory at the peak ({p.name}{': ' + p.note if p.note else ''})" + " " * 4 + "GiB")
    w = weight_bytes(s)
    detail = {"weights": f"4-bit NF4+DQ projections {_g(w['quantised'])}, embeddings/head/norms {_g(w['unquantised'])}"
              if recipe.model.quantization == "4bit" else "",
              "optimizer": recipe.train.optim}
    for key, value in plan.breakdown.items():
        if not value:
            continue
        name = TERM_LABELS.get(key, key) + (f" ({detail[key]})" if detail.get(key) else "")
        lines.append(f"  {name:<64} {_g(value):>6}")
    spare = g.memory - plan.peak_bytes
    verdict = f"fits, {spare / GiB:.1f} GiB to spare" if plan.fits else f"does NOT fit: {-spare / GiB:.1f} GiB short"
    lines.append(f"  {'peak':<64} {_g(plan.peak_bytes):>6}  of {g.memory / GiB:.1f} GiB: {verdict}")
    if len(plan.phases) > 1:
        lines.append("  phases: " + "; ".join(f"{ph.name} {sum(finish(ph.terms).values()) / GiB:.1f} GiB"
                                               for ph in plan.phases))
    if plan.advice:
        lines.append("")
        lines.append("to make it fit (each line on its own, with its new peak):")
        for a in plan.advice:
            flags = a.get("gpu_flag") or " ".join(f"--set {x}" for x in a["set"])
            lines.append(f"  {a['change']:<58} {a['peak_bytes'] / GiB:5.1f} GiB   {flags}")
    elif not plan.fits:
        lines.append("no change plan knows makes it fit on this GPU")
    lines.append("")
    lines.append("time")
    lines.append(f"  data      {plan.data.describe()}")
    sch = plan.schedule
    if sch.get("tokens_per_step"):
        lines.append(f"  step      {sch['sequences_per_step']} sequences, ~{sch['tokens_per_step']:,.0f} tokens per "
                     f"optimiser step" + (f"; {_n(sch['steps_per_epoch'], 'step')} per epoch" if sch.get("steps_per_epoch")
                                          else "") + (f"; {_n(sch['total_steps'], 'step')} in all"
                                                      + (" (train.max_steps)" if recipe.train.max_steps else
                                                         f" ({recipe.train.epochs:g} epoch{'' if recipe.train.epochs == 1 else 's'})")
                                                      if sch.get("total_steps") else ""))
    train = next((ph for ph in plan.phases if ph.name.startswith("train")), None)
    if train is not None and train.flops_per_token and train.step is not None:
        step = train.step
        other = flops_per_token(step, recompute=not step.checkpointing)
        lines.append(f"  compute   {_flops(train.flops_per_token)} per token (LoRA training "
                     f"{'with' if step.checkpointing else 'without'} recomputation; {_flops(other)} "
                     f"{'without' if step.checkpointing else 'with'})"
                     + (f" at {g.utilisation:.0%} of {g.tflops:g} TFLOPS ({g.source})" if g.utilisation else ""))
    if plan.hours is None:
        lines.append("  hours     unknown" + ("" if g.tflops else " (give --gpu a name for a time estimate)"))
    else:
        parts = "; ".join(f"{ph.name} {ph.seconds / 3600:.1f} h" for ph in plan.phases if ph.seconds) \
            if len(plan.phases) > 1 else ""
        fits = plan.hours <= plan.session_hours
        lines.append(f"  hours     {plan.hours:.1f} h" + (f" ({parts})" if parts else "") + ": "
                     + (f"fits one {plan.session_hours:g} h session" if fits else
                        f"more than one {plan.session_hours:g} h session: {plan.sessions} sessions, "
                        f"{plan.sessions - 1} --resume restart{'s' if plan.sessions > 2 else ''}"))
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


# ---------------------------------------------------------------- before training

MARGIN = 0.10  # refuse only when the plan's peak exceeds free memory by more than this (the planner's error band)


def check_before_training(recipe, *, force: bool = False, skip: tuple = (), log=print) -> Plan | None:
    """On a GPU, plan the recipe against the device's free memory; stop (UserError, exit 2) with the plan's advice
    when the peak exceeds it by a clear margin, unless `force`. Skipped on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name()
    here = GPU("this-gpu", f"{name}, {free / GiB:.1f} GiB free", free + CUDA_CONTEXT, None,
               bf16=torch.cuda.is_bf16_supported(), source="this device")
    try:
        plan = make(recipe, here, advice=False, skip=skip)
    except UserError as e:
        log(f"note: memory check skipped: {e}")
        return None
    need = plan.peak_bytes - CUDA_CONTEXT
    if need <= free * (1 + MARGIN):
        return plan
    text = (f"the plan's peak is {need / GiB:.1f} GiB of GPU memory ({plan.peak_phase.name}), but {name} has "
            f"{free / GiB:.1f} GiB free")
    if force:
        log(f"warning: {text}; training anyway (--force)")
        return plan
    plan.advice = advise(recipe, here, plan, skip=skip)
    lines = [text + ". Changes that fit (add them to the command):"]
    for a in plan.advice:
        if a["set"]:
            lines.append(f"  {a['change']}: {' '.join('--set ' + x for x in a['set'])} ({a['peak_bytes'] / GiB:.1f} GiB)")
    lines.append("See `llama-ft plan RECIPE --gpu ...` for the breakdown, or pass --force to train anyway.")
    raise UserError("\n".join(lines))
