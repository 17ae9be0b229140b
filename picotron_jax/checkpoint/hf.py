"""Convert between our checkpoints and Hugging Face Llama folders (config.json + model.safetensors).

Our weights are stored input-first (models/llama.py): wq [L, D, H, K], wo [L, H, K, D],
w_gate/w_up [L, D, F], w_down [L, F, D], lm_head [D, V]. `transformers`' LlamaForCausalLM stores
torch Linear weights output-first, one tensor per layer: q_proj [H*K, D], o_proj [D, H*K],
gate_proj [F, D], down_proj [D, F], lm_head [V, D]. Both apply rotary embeddings to the two
halves of each head (`rotate_half`), so no permutation of q/k is needed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from picotron_jax.config import Config, ModelConfig, config_from_dict
from picotron_jax.errors import UserError

# our per-layer name -> (HF module path, how to turn our [..] layer slice into HF's tensor)
_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_PROJ = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
         "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def params_to_hf(params: dict, m: ModelConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """Our parameter tree (host arrays) -> {HF tensor name: array}."""
    cast = lambda x: np.ascontiguousarray(np.asarray(x, np.float32).astype(dtype))  # noqa: E731
    out = {"model.embed_tokens.weight": cast(params["embed"]), "model.norm.weight": cast(params["final_norm"])}
    if not m.tie_embeddings:
        out["lm_head.weight"] = cast(np.asarray(params["lm_head"]).T)  # [D, V] -> [V, D]
    layers = params["layers"]
    for i in range(m.num_layers):
        pre = f"model.layers.{i}."
        for ours, theirs in _NORMS.items():
            out[pre + theirs + ".weight"] = cast(layers[ours][i])
        for ours, theirs in _PROJ.items():
            w = np.asarray(layers[ours][i])
            w_in_out = w.reshape(w.shape[0] * w.shape[1], -1) if ours == "wo" else w.reshape(w.shape[0], -1)
            out[pre + theirs + ".weight"] = cast(w_in_out.T)  # [in, out] -> [out, in]
    return out


def hf_to_params(tensors: dict[str, np.ndarray], m: ModelConfig) -> dict:
    """{HF tensor name: array} -> our parameter tree (host float32 arrays)."""
    L, D, F = m.num_layers, m.hidden_size, m.intermediate_size
    H, G, K, V = m.num_heads, m.num_kv_heads, m.resolved_head_dim, m.vocab_size
    shapes = {"wq": (D, H, K), "wk": (D, G, K), "wv": (D, G, K), "wo": (H, K, D), "w_gate": (D, F), "w_up": (D, F),
              "w_down": (F, D)}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"Hugging Face weights lack tensor {name!r}; is this a Llama model?")
        return np.asarray(tensors[name]).astype(np.float32)

    layers: dict[str, list] = {k: [] for k in (*_NORMS, *_PROJ)}
    for i in range(L):
        pre = f"model.layers.{i}."
        for ours, theirs in _NORMS.items():
            layers[ours].append(get(pre + theirs + ".weight"))
        for ours, theirs in _PROJ.items():
            layers[ours].append(get(pre + theirs + ".weight").T.reshape(shapes[ours]))
    params = {"embed": get("model.embed_tokens.weight"), "final_norm": get("model.norm.weight"),
              "layers": {k: np.stack(v) for k, v in layers.items()}}
    if not m.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T  # [V, D] -> [D, V]
    if params["embed"].shape != (V, D):
        raise UserError(f"Hugging Face embed_tokens has shape {params['embed'].shape}, config.json says {(V, D)}")
    return params


def hf_config(m: ModelConfig, max_positions: int, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "head_dim": m.resolved_head_dim,
        "rope_theta": m.rope_theta, "rms_norm_eps": m.rms_norm_eps, "tie_word_embeddings": m.tie_embeddings,
        "max_position_embeddings": max_positions, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "rope_scaling": None, "initializer_range": m.init_std, "torch_dtype": dtype, "dtype": dtype,
        # transformers >= 5 reads the rotary settings from here, older versions from the top level
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
    }


def model_config_from_hf(raw: dict, base: ModelConfig) -> ModelConfig:
    """config.json -> our ModelConfig (fields that only we have, like scan_unroll, come from `base`)."""
    unsupported = []
    if raw.get("model_type") not in ("llama", None):
        unsupported.append(f"model_type = {raw.get('model_type')!r} (only 'llama')")
    if raw.get("rope_scaling"):
        unsupported.append(f"rope_scaling = {raw['rope_scaling']!r} (only none)")
    rope = raw.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope_parameters.rope_type = {rope['rope_type']!r} (only 'default')")
    if raw.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act = {raw['hidden_act']!r} (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            unsupported.append(f"{flag} = true (only false)")
    if unsupported:
        raise UserError("cannot start from this Hugging Face model: " + "; ".join(unsupported))
    heads = raw["num_attention_heads"]
    return ModelConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"], num_heads=heads, num_kv_heads=raw.get("num_key_value_heads", heads),
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        init_std=float(raw.get("initializer_range", base.init_std)), scan_unroll=base.scan_unroll,
    )


def _read_hf_folder(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model folder: it has no config.json")
    raw = json.loads((path / "config.json").read_text())
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        if not (path / name).is_file():
            raise UserError(f"{path / name} is missing (Hugging Face weights must be in safetensors format)")
        tensors.update(load_file(path / name))
    return raw, tensors


# ------------------------------------------------------------------------------------ commands


def apply_hf_model_config(source: list[str], cfg: Config) -> str:
    """`--from hf PATH`: replace cfg.model with the folder's architecture; returns PATH."""
    kind, path = source
    if kind != "hf":
        raise UserError(f"--from {kind!r}: the only supported source format is 'hf' (--from hf PATH)")
    if cfg.moe.enabled:
        raise UserError(f"--from hf {path}: Hugging Face Llama folders hold dense models; this config has MoE layers "
                        f"(moe.num_experts = {cfg.moe.num_experts}). Set moe.num_experts=0")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"--from hf {path}: no config.json there (a Hugging Face Llama folder holds config.json and "
                        f"model.safetensors)")
    cfg.model = model_config_from_hf(json.loads((folder / "config.json").read_text()), cfg.model)
    return path


def train_state_from_hf(path: str, cfg: Config, setup: Any) -> Any:
    """A fresh train state (step 0, new optimizer state) whose parameters are the folder's weights."""
    from picotron_jax.train.state import state_from_params

    _, tensors = _read_hf_folder(Path(path))
    host = hf_to_params(tensors, cfg.model)
    params = jax.tree.map(lambda a, s, sh: jax.device_put(a.astype(s.dtype), sh),
                          host, setup.spec.shapes, setup.shardings.params)

    return state_from_params(cfg, setup, params)


def load_checkpoint_params(step_dir: Any) -> tuple[dict, Config]:
    """Parameters of one checkpoint step as host numpy arrays, and the run's config (no mesh needed); parameters
    stored lossy (checkpoint.quantize_params) come back as float32."""
    from picotron_jax.checkpoint.quantize import decode_host
    from picotron_jax.checkpoint.restore import read_meta

    meta = read_meta(step_dir)
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
    tree = checkpointer.metadata(step_dir / "state").item_metadata.tree
    item = {"params": jax.tree.map(lambda _: 0, tree["params"])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
    return decode_host(restored["params"], meta.get("quantization"), "params"), config_from_dict(meta["config"])


def export_to_hf(step_dir: Any, out: Path, dtype: str = "float32") -> Path:
    from safetensors.numpy import save_file

    params, cfg = load_checkpoint_params(step_dir)
    if cfg.moe.enabled:
        raise UserError(f"checkpoint {step_dir} is a Mixture-of-Experts model (moe.num_experts = "
                        f"{cfg.moe.num_experts}); export --to hf writes dense Llama folders only")
    out.mkdir(parents=True, exist_ok=True)
    tensors = params_to_hf(params, cfg.model, DTYPES[dtype])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes 0600; the folder is meant to be shared
    (out / "config.json").write_text(json.dumps(hf_config(cfg.model, cfg.train.seq_len, dtype), indent=2) + "\n")
    write_tokenizer(cfg.data.tokenizer, out)
    return out


def byte_level_tokenizer():
    """Our byte tokenizer (UTF-8 bytes as ids 0..255, no merges) as a Hugging Face `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes, in GPT-2's byte order
    byte_to_char = _bytes_to_unicode()
    assert sorted(byte_to_char.values()) == sorted(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (what ByteLevel pre-tokenizes into)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(spec: str, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json, so `AutoTokenizer.from_pretrained(out)` and `pipeline()` work: the
    run's own tokenizer.json, or the byte-level one (`data.tokenizer: byte`; id 0, NUL, ends a document)."""
    if spec == "byte":
        byte_level_tokenizer().save(str(out / "tokenizer.json"))
        eos = "\u0100"  # byte 0's stand-in character
    else:
        source = Path(spec)
        source = source / "tokenizer.json" if source.is_dir() else source
        if not source.is_file():
            return
        shutil.copyfile(source, out / "tokenizer.json")
        eos = None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30, "clean_up_tokenization_spaces": False}
    if eos is not None:
        config["eos_token"] = eos
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
