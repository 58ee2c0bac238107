"""GGUF export of a merged Llama 2 folder, for llama.cpp and the tools built on it.

Written with the `gguf` package, tensor by tensor (one tensor in memory at a time), with the
metadata llama.cpp needs to load and chat: architecture and shapes, the SentencePiece vocabulary
(pieces, scores, types; the tokenizer's added tokens; unused padding tokens for embedding rows beyond
them, as llama.cpp's converter writes), bos/eos/unk/pad ids, and the Llama 2 chat template. Types: f16 (2-D
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


def vocabulary(model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list, int]:
    """(pieces, scores, types, number of added tokens) for `vocab_size` embedding rows, as llama.cpp's
    convert_hf_to_gguf.py builds them: the SentencePiece pieces; then the tokenizer's added tokens at their ids
    (tokenizer.json's added_tokens, tokenizer_config.json's added_tokens_decoder, added_tokens.json): CONTROL
    when special (or <pad>, <|...|>-like), else USER_DEFINED with ▁ as a space; every row left over is an
    unused "[PAD{id}]" token, so a vocabulary padded to a multiple of 64 (or grown by an added pad token)
    loads. Unlike the converter, an added entry that repeats a SentencePiece piece at its own id (<unk>, <s>,
    </s>) keeps the SentencePiece type."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    if sp.get_piece_size() > vocab_size:
        raise UserError(f"{model_dir}: tokenizer.model has {sp.get_piece_size()} pieces, more than the model's "
                        f"{vocab_size} embedding rows (config.json vocab_size): not this model's tokenizer")
    pieces = [f"[PAD{i}]".encode("utf-8") for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(sp.get_piece_size()):
        pieces[i], scores[i] = sp.id_to_piece(i).encode("utf-8"), sp.get_score(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                    else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
                    else gguf.TokenType.NORMAL)
    added = 0
    for token_id, text, is_special in _added_tokens(model_dir):
        if token_id >= vocab_size:
            raise UserError(f"{model_dir}: added token {text!r} has id {token_id}, beyond the model's {vocab_size} "
                            "embedding rows (resize the embeddings when adding tokens)")
        if token_id < sp.get_piece_size() and pieces[token_id] == text.encode("utf-8"):
            continue
        look_special = text == "<pad>" or (text.startswith("<|") and text.endswith("|>"))
        if not (is_special or look_special):
            text = text.replace("\u2581", " ")  # the converter's pre-normalised user-defined spaces
        pieces[token_id], scores[token_id] = text.encode("utf-8"), -1000.0
        types[token_id] = gguf.TokenType.CONTROL if is_special or look_special else gguf.TokenType.USER_DEFINED
        added += 1
    return pieces, scores, types, added


def _added_tokens(model_dir: Path) -> list[tuple[int, str, bool]]:
    """(id, text, special) of every added token the tokenizer files list (tokenizer.json first)."""
    found: dict[int, tuple[int, str, bool]] = {}
    tokenizer_json = _read_json(model_dir / "tokenizer.json")
    for entry in tokenizer_json.get("added_tokens", []):
        found.setdefault(int(entry["id"]), (int(entry["id"]), entry["content"], bool(entry.get("special"))))
    for token_id, entry in _read_json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        found.setdefault(int(token_id), (int(token_id), entry["content"], bool(entry.get("special"))))
    for text, token_id in _read_json(model_dir / "added_tokens.json").items():
        found.setdefault(int(token_id), (int(token_id), text, False))
    return [found[i] for i in sorted(found)]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken-like {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def export(model_dir: str | Path, path: str | Path, qtype: str = "f16", *, log=print) -> dict:
    """Write the merged Llama folder `model_dir` as one GGUF file of type `qtype` at `path` (via path.partial, then
    a rename); returns {file, type, bytes, tensors}."""
    import gguf

    model_dir, path = Path(model_dir), Path(path)
    if qtype not in TYPES:
        raise UserError(f"GGUF type {qtype!r}: expected one of {', '.join(TYPES)}")
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise UserError(f"{model_dir}: GGUF export supports Llama checkpoints, not {config.get('model_type')!r}")
    if not (model_dir / "tokenizer.model").is_file():
        raise UserError(f"{model_dir}: no tokenizer.model (the SentencePiece model GGUF's vocabulary is made from)")
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]

    writer = gguf.GGUFWriter(str(path) + ".partial", "llama")
    _write_metadata(writer, model_dir, config, qtype)
    _write_vocabulary(writer, model_dir, config, log)
    layout = _tensor_layout(model_dir, qtype)
    _write_tensors(writer, layout, n_head, n_kv)
    os.replace(str(path) + ".partial", path)
    size = path.stat().st_size
    log(f"wrote {path.name} ({qtype}, {size / 2**20:.1f} MiB, {len(layout)} tensors)")
    return {"file": path.name, "type": qtype, "bytes": size, "tensors": len(layout)}


def _write_metadata(writer, model_dir: Path, config: dict, qtype: str) -> None:
    """Architecture and shapes, as llama.cpp reads them."""
    import gguf

    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // n_head)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)


def _write_vocabulary(writer, model_dir: Path, config: dict, log) -> None:
    """The SentencePiece vocabulary, the special token ids and the chat template."""
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    pieces, scores, types, added = vocabulary(model_dir, config["vocab_size"])
    padding = sum(1 for i, p in enumerate(pieces) if p == f"[PAD{i}]".encode("utf-8"))
    if added or padding:
        log(f"vocabulary: {len(pieces) - added - padding} SentencePiece pieces, {added} added token(s), "
            f"{padding} unused padding token(s) for the model's {len(pieces)} embedding rows")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    ids = {piece: i for i, piece in reversed(list(enumerate(pieces)))}
    special = {name: _token_text(tokenizer_config.get(f"{name}_token")) for name in ("bos", "eos", "unk", "pad")}
    unk = ids.get((special["unk"] or "<unk>").encode("utf-8"), 0)
    writer.add_bos_token_id(ids.get((special["bos"] or "<s>").encode("utf-8"), 1))
    writer.add_eos_token_id(ids.get((special["eos"] or "</s>").encode("utf-8"), 2))
    writer.add_unk_token_id(unk)
    # the tokenizer's pad token (llama-ft pads with <unk>, as in training; a checkpoint may bring its own <pad>)
    writer.add_pad_token_id(ids.get(special["pad"].encode("utf-8"), unk) if special["pad"] else unk)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer_config.get("chat_template") or chat_format.TEMPLATE)


def _tensor_layout(model_dir: Path, qtype: str) -> list[tuple]:
    """[(shard, key, GGUF name, shape, GGUF type)] for every tensor: 1-D ones (norms) stay float32."""
    import gguf
    from safetensors import safe_open

    layout = []
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "np") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                target_type = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else (
                    gguf.GGMLQuantizationType.F16 if qtype == "f16" else gguf.GGMLQuantizationType.Q8_0)
                layout.append((shard, key, gguf_name(key), tuple(shape), target_type))
    return layout


def _write_tensors(writer, layout: list[tuple], n_head: int, n_kv: int) -> None:
    """Tensor infos first (shapes and sizes only), then the data, one tensor in memory at a time."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    for _, _, name, shape, target_type in layout:
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
    for shard, key, name, shape, target_type in layout:
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
