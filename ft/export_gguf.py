"""GGUF export of a merged Llama 2 folder, for llama.cpp and the tools built on it.

Written with the `gguf` package, tensor by tensor (one tensor in memory at a time), with the
metadata llama.cpp needs to load and chat: architecture and shapes, the SentencePiece vocabulary
(pieces, scores, types), bos/eos/unk/pad ids, and the Llama 2 chat template. Types: f16 (2-D
weights in float16) and q8_0 (2-D weights in 8-bit blocks); norms stay float32, as llama.cpp's
own converter does. Q and K projections are permuted from Hugging Face's rotary layout to the
interleaved one llama.cpp expects (the inverse of transformers' conversion script).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ft import chat_format
from ft.errors import UserError

TYPES = ("f16", "q8_0")

NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in NAMES:
        return NAMES[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in LAYER_NAMES:
        return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:])]}"
    raise UserError(f"GGUF export: unexpected tensor {hf_name!r} (only Llama checkpoints are supported)")


def permute(weight, n_head: int):
    """Hugging Face's rotary layout (halves) -> llama.cpp's (interleaved pairs), per head."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def export(model_dir: str | Path, path: str | Path, qtype: str = "f16", *, log=print) -> dict:
    import gguf
    import numpy as np
    import sentencepiece as spm
    from safetensors import safe_open

    model_dir, path = Path(model_dir), Path(path)
    if qtype not in TYPES:
        raise UserError(f"GGUF type {qtype!r}: expected one of {', '.join(TYPES)}")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise UserError(f"{model_dir}: GGUF export supports Llama checkpoints, not {config.get('model_type')!r}")
    if not (model_dir / "tokenizer.model").is_file():
        raise UserError(f"{model_dir}: no tokenizer.model (the SentencePiece model GGUF's vocabulary is made from)")
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head

    writer = gguf.GGUFWriter(str(path) + ".partial", "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        types.append(kind)
    if len(pieces) != config["vocab_size"]:
        raise UserError(f"{model_dir}: tokenizer.model has {len(pieces)} pieces, the model {config['vocab_size']}")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_pad_token_id(sp.unk_id())  # llama-ft pads with <unk>, as in training
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer_config.get("chat_template") or chat_format.TEMPLATE)

    # tensor infos first (shapes and sizes only), then the data, one tensor at a time
    shards = sorted(model_dir.glob("*.safetensors"))
    plan = []
    for shard in shards:
        with safe_open(str(shard), "np") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                target_type = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else (
                    gguf.GGMLQuantizationType.F16 if qtype == "f16" else gguf.GGMLQuantizationType.Q8_0)
                plan.append((shard, key, gguf_name(key), tuple(shape), target_type))
    for _, _, name, shape, target_type in plan:
        if target_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        elif target_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor_info(name, shape, np.dtype(np.float16), int(np.prod(shape)) * 2)
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, target_type)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=target_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for shard, key, name, shape, target_type in plan:
        with safe_open(str(shard), "pt") as f:
            tensor = f.get_tensor(key).float()
        if name.endswith("attn_q.weight"):
            tensor = permute(tensor, n_head)
        elif name.endswith("attn_k.weight"):
            tensor = permute(tensor, n_kv)
        data = tensor.numpy()
        if target_type == gguf.GGMLQuantizationType.F32:
            data = data.astype(np.float32)
        elif target_type == gguf.GGMLQuantizationType.F16:
            data = data.astype(np.float16)
        else:
            data = gguf.quants.quantize(data.astype(np.float32), target_type)
        writer.write_tensor_data(data)
    writer.close()
    os.replace(str(path) + ".partial", path)
    size = path.stat().st_size
    log(f"wrote {path.name} ({qtype}, {size / 2**20:.1f} MiB, {len(plan)} tensors)")
    return {"file": path.name, "type": qtype, "bytes": size, "tensors": len(plan)}
