#!/usr/bin/env python3
"""Export a llama-architecture GGUF model to ONNX for Sluice's ONNX Runtime backend.

    python scripts/export_onnx.py --model models/X.gguf --out DIR [--accuracy-level 0|4]

Writes into DIR:
  model.onnx + model.onnx.data   the network, using ONNX Runtime contrib ops
  tokenizer.gguf                 the source GGUF's metadata only (no tensors), so
                                 the server loads tokenizer and chat template with
                                 its ordinary GGUF loader
  manifest.json                  hyperparameters + provenance (format "sluice-onnx/2")

Graph contract (the Rust runtime is written against exactly these names); B is 1 for
any chunk of one sequence, or several sequences decoding one token each (S = 1) with
their past right-padded to the longest:
  inputs   input_ids              int64   [B, S]
           seqlens_k              int32   [B]     each row's total_len - 1
           total_sequence_length  int32   []      the longest total_len = past_len + S
           past_key_values.{i}.key / .value
                                  float32 [B, n_kv_heads, past_len, head_dim]
  outputs  logits                 float32 [B, S, vocab]
           present.{i}.key / .value
                                  float32 [B, n_kv_heads, total_len, head_dim]
                                          (row b valid up to its own total_len)

Weights are carried over without requantization: Q4_0/Q4_1/Q8_0 blocks become
MatMulNBits blobs whose weights equal ggml's own float32 dequantization (Q4_1
with its per-block offset as a small extra MatMul), a tied LM head reuses the
exactly dequantized embedding table, F32/F16 stay exact in a plain MatMul, and
any other ggml type is dequantized to float32 (exact, but large).

--accuracy-level sets MatMulNBits' compute type. 0 (the default) multiplies in
float32: the GGUF's network exactly. 4 quantizes each activation row to int8 per
32-value block (scale max|x|/127, ties to even, as ggml's Q8 activations) and
multiplies integers: 1.4-1.9x faster decoding, and a tied Q8_0 LM head then
runs as an 8-bit MatMulNBits too. Level 4 does not bring greedy output closer
to Sluice's CPU runtime (or llama.cpp), although they quantize activations the
same way. With 8-bit activations any last-bit difference upstream (summation
order, f16-rounded scales, f16 K/V) flips some roundings, and 30 layers amplify
the flips into noise of ~0.09 nats per logprob: two int8 runs that differ only
in the f16 rounding of their scales sit as far apart as either does from
float32. Level 0 adds no such noise of its own, so it is the closer of the two.
Measured on SmolLM2-135M Q4_1, 8 chats of 64 greedy tokens against Sluice's CPU
runtime: level 0 equal on 2, every divergence a near-tie (<= 0.145 nats);
level 4 equal on 1, two divergences at 0.34-0.36 nats. Levels 1-3 (fp32, fp16,
bf16) give the same output as 0 on ONNX Runtime's CPU kernels, so are not offered.

Requires only numpy, onnx and gguf (scripts/export-onnx-requirements.txt).
Verify an export with scripts/check_onnx_export.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys

import numpy as np
import onnx
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants
from onnx import TensorProto, helper, numpy_helper

FORMAT = "sluice-onnx/2"
QK = 32  # ggml block size of Q4_0/Q4_1/Q8_0, used as MatMulNBits block_size
# MatMulNBits accuracy_level: 0 = float32 compute; 4 = int8 activations, quantized
# per block_size (= QK, as ggml does). See the module docstring for the choice.
ACCURACY_LEVELS = (0, 4)
# Opset 21 is what ONNX Runtime's own generators (onnxruntime-genai) target;
# IR 10 is the IR version that goes with it, so older runtimes can load it too.
OPSET = 21
IR_VERSION = 10


# --------------------------------------------------------------------------
# GGUF helpers
# --------------------------------------------------------------------------

class Gguf:
    def __init__(self, path: str):
        self.reader = GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.used: set[str] = set()
        self.arch = self.get_str("general.architecture")

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def get_str(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise SystemExit(f"error: GGUF metadata key {key!r} is missing")
        return value

    def get_int(self, key: str, default=None) -> int:
        value = self.get(key, default)
        if value is None:
            raise SystemExit(f"error: GGUF metadata key {key!r} is missing")
        return int(value)

    def tensor(self, name: str):
        t = self.tensors.get(name)
        if t is None:
            raise SystemExit(f"error: GGUF tensor {name!r} is missing")
        self.used.add(name)
        return t


def f16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The little-endian f16 at byte `offset` of every block, as float32."""
    return blocks[..., offset:offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def dequantize(t) -> np.ndarray:
    """Exact float32 values of a GGUF tensor, shaped [rows, ne0] (ggml order reversed)."""
    if t.tensor_type == QT.F32:
        w = np.asarray(t.data, dtype=np.float32)
    elif t.tensor_type == QT.F16:
        w = np.asarray(t.data).view(np.float16).astype(np.float32)
    else:
        w = quants.dequantize(t.data, t.tensor_type)
    return w.reshape([int(d) for d in reversed(t.shape)])


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------
# ggml blocks -> MatMulNBits
#
# MatMulNBits stores B as [N, K/block, blob] with element 2j of a block in the
# low nibble of byte j and 2j+1 in the high nibble; ggml's Q4 blocks instead put
# element j in the low nibble and j+16 in the high nibble of byte j, so nibbles
# are unpacked to element order and packed again.
#
# Only uint8 zero points are used: ONNX Runtime's CPU kernel has no fast path
# for float zero points (measured ~20x slower: it dequantizes all of B on every
# call) and none at all for 8-bit weights with float zero points.
# --------------------------------------------------------------------------

def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 2j] in the low, [..., 2j+1] in the high nibble (last axis padded to even)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def ggml_q4_nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] ggml Q4 bytes -> [..., 32] 4-bit values in element order."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def q4_1_to_nbits(raw: np.ndarray, n: int, k: int):
    """Q4_1 (value = d*q + m) as d*(q - z) + m' with an integer zero point z.

    MatMulNBits computes the d*(q - z) part (exact in float32: an f16 times a
    small integer) and the graph adds sum_block(x) * m' separately. z is the
    integer nearest -m/d when m' = m + d*z is then exactly representable,
    which centres both parts and keeps the offset term small; otherwise z = 0
    and m' = m. Either way d*(q - z) + m' is exactly ggml's d*q + m.
    """
    blocks = raw.reshape(n, k // QK, 20)
    d = f16_field(blocks, 0).astype(np.float64)
    m = f16_field(blocks, 2).astype(np.float64)
    q = ggml_q4_nibbles(blocks[..., 4:20])

    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(d != 0, np.clip(np.rint(-m / d), 0, 15), 0)
    offset = m + d * z  # exact in float64 (f16 values, small integer z)
    exact = offset.astype(np.float32).astype(np.float64) == offset
    z = np.where(exact, z, 0).astype(np.uint8)
    offset = np.where(exact, offset, m).astype(np.float32)
    return pack_nibbles(q), d.astype(np.float32).reshape(-1), pack_nibbles(z).reshape(-1), offset


def q4_0_to_nbits(raw: np.ndarray, n: int, k: int):
    """Q4_0 (value = d*(q - 8)): zero point 8."""
    blocks = raw.reshape(n, k // QK, 18)
    d = f16_field(blocks, 0)
    q = ggml_q4_nibbles(blocks[..., 2:18])
    z = np.full((n, k // QK), 8, dtype=np.uint8)
    return pack_nibbles(q), d.reshape(-1), pack_nibbles(z).reshape(-1), None


def q8_0_to_nbits(raw: np.ndarray, n: int, k: int):
    """Q8_0 (value = d*q, q int8): 8-bit MatMulNBits with uint8 q+128, zero point 128."""
    blocks = raw.reshape(n, k // QK, 34)
    d = f16_field(blocks, 0)
    q = (blocks[..., 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    zp = np.full(n * (k // QK), 128, dtype=np.uint8)
    return q, d.reshape(-1), zp, None


NBITS = {
    QT.Q4_0: (4, q4_0_to_nbits),
    QT.Q4_1: (4, q4_1_to_nbits),
    QT.Q8_0: (8, q8_0_to_nbits),
}


# --------------------------------------------------------------------------
# Graph construction
# --------------------------------------------------------------------------

class Graph:
    def __init__(self, accuracy_level: int = 0):
        self.accuracy_level = accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.fallback: list[str] = []
        self._block_sums: dict[str, str] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs, outputs, name: str, domain: str = "", **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def block_sums(self, x: str, k: int) -> str:
        """[1, S, K] -> [1, S, K/32]: sums of x over each quantization block.

        Shared by every linear layer reading the same activation (q/k/v, gate/up).
        """
        if x not in self._block_sums:
            shape = self.init(f"{x}.blocks_shape", np.array([0, 0, k // QK, QK], np.int64))
            blocks = self.node("Reshape", [x, shape], [f"{x}.blocks"], f"{x}.blocks")
            axes = self.init(f"{x}.blocks_axes", np.array([-1], np.int64))
            self._block_sums[x] = self.node("ReduceSum", [blocks, axes], [f"{x}.block_sums"],
                                            f"{x}.block_sums", keepdims=0)
        return self._block_sums[x]

    def linear(self, x: str, tensors, out: str, name: str) -> str:
        """x @ W^T for one GGUF weight, or several stacked along N (same type and K).

        Stacking rows of independent outputs is exact, and lets one kernel do
        q/k/v or gate/up at once.
        """
        types = {t.tensor_type for t in tensors}
        ks = {int(t.shape[0]) for t in tensors}
        if len(types) != 1 or len(ks) != 1:
            # Mixed types cannot share one blob; keep each exact on its own.
            parts = [self.linear(x, [t], f"{name}.part{j}", f"{name}.part{j}")
                     for j, t in enumerate(tensors)]
            return self.node("Concat", parts, [out], name, axis=-1)
        qtype, k = types.pop(), ks.pop()
        n = sum(int(t.shape[1]) for t in tensors)

        if qtype in NBITS and k % QK == 0:
            bits, convert = NBITS[qtype]
            raw = np.concatenate([np.asarray(t.data).reshape(int(t.shape[1]), -1) for t in tensors])
            b, scales, zp, offsets = convert(raw, n, k)
            y = self.node(
                "MatMulNBits",
                [x, self.init(f"{name}.qweight", b), self.init(f"{name}.scales", scales),
                 self.init(f"{name}.zero_points", zp)],
                [out if offsets is None else f"{name}.scaled"], name, domain="com.microsoft",
                K=k, N=n, bits=bits, block_size=QK, accuracy_level=self.accuracy_level,
            )
            if offsets is None:
                return y
            corr = self.node("MatMul", [self.block_sums(x, k), self.init(f"{name}.offsets_t", offsets.T)],
                             [f"{name}.offset"], f"{name}.offset")
            return self.node("Add", [y, corr], [out], f"{name}.add_offset")

        if qtype not in (QT.F32, QT.F16):
            self.fallback.append(f"{tensors[0].name} ({qtype.name})")
        w = np.concatenate([dequantize(t) for t in tensors])  # [N, K]
        return self.node("MatMul", [x, self.init(f"{name}.weight_t", w.T)], [out], name)


def rope_caches(g: Gguf, arch: str, head_dim: int, max_len: int):
    """cos/sin caches [max_len, head_dim/2] for GroupQueryAttention's rotary."""
    rot_dim = g.get_int(f"{arch}.rope.dimension_count", head_dim)
    if rot_dim != head_dim:
        raise SystemExit(f"error: partial rotary ({rot_dim} of {head_dim}) is not supported")
    theta = float(g.get(f"{arch}.rope.freq_base", 10000.0))
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)

    scaling = g.get(f"{arch}.rope.scaling.type", "none")
    factor = float(g.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if scaling == "linear":
        inv_freq = inv_freq / factor
    elif scaling not in ("none", None) and factor != 1.0:
        raise SystemExit(f"error: rope scaling {scaling!r} is not supported")
    if "rope_freqs.weight" in g.tensors:  # llama-3 style per-frequency divisors
        inv_freq = inv_freq / dequantize(g.tensor("rope_freqs.weight")).reshape(-1).astype(np.float64)

    # float64 angles, rounded once: position * freq loses precision in float32
    # at long contexts.
    angles = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build_model(g: Gguf, accuracy_level: int = 0):
    arch = g.arch
    if arch != "llama":
        raise SystemExit(f"error: architecture {arch!r} is not supported (llama only)")

    n_layers = g.get_int(f"{arch}.block_count")
    hidden = g.get_int(f"{arch}.embedding_length")
    n_heads = g.get_int(f"{arch}.attention.head_count")
    n_kv_heads = g.get_int(f"{arch}.attention.head_count_kv", n_heads)
    head_dim = g.get_int(f"{arch}.attention.key_length", hidden // n_heads)
    if g.get_int(f"{arch}.attention.value_length", head_dim) != head_dim:
        raise SystemExit("error: key_length != value_length is not supported")
    context_length = g.get_int(f"{arch}.context_length")
    eps = float(g.get(f"{arch}.attention.layer_norm_rms_epsilon"))

    embd = g.tensor("token_embd.weight")
    vocab = int(embd.shape[1])
    if int(embd.shape[0]) != hidden:
        raise SystemExit("error: token_embd.weight does not match embedding_length")
    # Tied embeddings: llama.cpp falls back to token_embd when output.weight is absent.
    lm_head = g.tensor("output.weight") if "output.weight" in g.tensors else embd

    gr = Graph(accuracy_level)

    def norm_weight(name: str) -> str:
        return gr.init(name, dequantize(g.tensor(name)).reshape(-1))

    # The embedding is a plain Gather over exactly dequantized float32 rows.
    table = gr.init("token_embd.weight", dequantize(embd))
    x = gr.node("Gather", [table, "input_ids"], ["embeddings"], "embed", axis=0)

    cos, sin = rope_caches(g, arch, head_dim, context_length)
    gr.init("cos_cache", cos)
    gr.init("sin_cache", sin)

    residual = None
    mlp_out = None
    for i in range(n_layers):
        p = f"blk.{i}"
        if residual is None:
            h = gr.node("SimplifiedLayerNormalization", [x, norm_weight(f"{p}.attn_norm.weight")],
                        [f"{p}.attn_norm"], f"{p}.attn_norm", axis=-1, epsilon=eps)
            residual = x
        else:
            # Residual add and RMSNorm in one kernel; output 3 is the sum.
            h, residual = gr.node(
                "SkipSimplifiedLayerNormalization",
                [mlp_out, residual, norm_weight(f"{p}.attn_norm.weight")],
                [f"{p}.attn_norm", "", "", f"{p}.attn_residual"],
                f"{p}.attn_norm", domain="com.microsoft", epsilon=eps)[::3]

        # Packed q|k|v: GroupQueryAttention splits it itself when key/value are empty.
        qkv = gr.linear(h, [g.tensor(f"{p}.attn_q.weight"), g.tensor(f"{p}.attn_k.weight"),
                            g.tensor(f"{p}.attn_v.weight")], f"{p}.attn_qkv", f"{p}.attn_qkv")
        attn = gr.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
            [f"{p}.attn", f"present.{i}.key", f"present.{i}.value"],
            f"{p}.attn", domain="com.microsoft",
            num_heads=n_heads, kv_num_heads=n_kv_heads, scale=1.0 / math.sqrt(head_dim),
            do_rotary=1,
            # ggml's llama rope (LLAMA_ROPE_TYPE_NORM) rotates adjacent pairs
            # (x[2i], x[2i+1]); convert_hf_to_gguf permutes HF's q/k rows to
            # that layout. Interleaved rotary is the same pairing. Confirmed
            # against a numpy reference in scripts/check_onnx_export.py, which
            # also shows that 0 gives wrong logits.
            rotary_interleaved=1,
        )[0]
        attn_out = gr.linear(attn, [g.tensor(f"{p}.attn_output.weight")], f"{p}.attn_output", f"{p}.attn_output")

        h, residual = gr.node(
            "SkipSimplifiedLayerNormalization",
            [attn_out, residual, norm_weight(f"{p}.ffn_norm.weight")],
            [f"{p}.ffn_norm", "", "", f"{p}.ffn_residual"],
            f"{p}.ffn_norm", domain="com.microsoft", epsilon=eps)[::3]

        ffn = int(g.tensors[f"{p}.ffn_gate.weight"].shape[1])
        gate_up = gr.linear(h, [g.tensor(f"{p}.ffn_gate.weight"), g.tensor(f"{p}.ffn_up.weight")],
                            f"{p}.ffn_gate_up", f"{p}.ffn_gate_up")
        gate, up = gr.node("Split", [gate_up, gr.init(f"{p}.ffn_split", np.array([ffn, ffn], np.int64))],
                           [f"{p}.ffn_gate", f"{p}.ffn_up"], f"{p}.ffn_split", axis=-1)
        # SwiGLU: silu(gate) * up, silu(x) = x * sigmoid(x).
        sig = gr.node("Sigmoid", [gate], [f"{p}.ffn_sigmoid"], f"{p}.ffn_sigmoid")
        silu = gr.node("Mul", [gate, sig], [f"{p}.ffn_silu"], f"{p}.ffn_silu")
        act = gr.node("Mul", [silu, up], [f"{p}.ffn_act"], f"{p}.ffn_act")
        mlp_out = gr.linear(act, [g.tensor(f"{p}.ffn_down.weight")], f"{p}.ffn_down", f"{p}.ffn_down")

    final = gr.node("SkipSimplifiedLayerNormalization",
                    [mlp_out, residual, norm_weight("output_norm.weight")],
                    ["output_norm"], "output_norm", domain="com.microsoft", epsilon=eps)
    if lm_head is embd and (accuracy_level == 0 or embd.tensor_type not in NBITS):
        # Tied head: Gemm(transB) over the same float32 table as the Gather.
        # Exact, stored once, and ~20x faster on CPU than 8-bit MatMulNBits,
        # which has only a dequantize-everything path at accuracy_level 0.
        # At level 4 the int8 kernel beats this Gemm (SmolLM2's 49152x576
        # head: ~2 vs ~3.5 ms a token), so a quantized table goes the
        # MatMulNBits way below: one more copy, in its own type, beside the
        # Gather's float32 table.
        flat = gr.node("Reshape", [final, gr.init("lm_head.in_shape", np.array([-1, hidden], np.int64))],
                       ["lm_head.in"], "lm_head.in")
        y = gr.node("Gemm", [flat, table], ["lm_head.out"], "lm_head", transB=1)
        # Back to [batch, sequence, vocab]: the batch and sequence sizes come from
        # input_ids, so one run may step several sequences (decode batches).
        ids_shape = gr.node("Shape", ["input_ids"], ["lm_head.ids_shape"], "lm_head.ids_shape")
        out_shape = gr.node("Concat", [ids_shape, gr.init("lm_head.vocab", np.array([vocab], np.int64))],
                            ["lm_head.out_shape"], "lm_head.out_shape", axis=0)
        gr.node("Reshape", [y, out_shape], ["logits"], "lm_head.out")
    else:
        gr.linear(final, [lm_head], "logits", "lm_head")

    leftover = sorted(set(g.tensors) - g.used)
    if leftover:
        raise SystemExit(f"error: GGUF tensors not understood by this exporter: {leftover[:8]}")

    # The batch is one sequence (any chunk), or several decoding one token each with
    # their past right-padded to the longest (GroupQueryAttention reads each row's own
    # length from seqlens_k).
    f32 = TensorProto.FLOAT
    kv_past = ["batch", n_kv_heads, "past_sequence_length", head_dim]
    kv_total = ["batch", n_kv_heads, "total_sequence_length", head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence_length"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "sequence_length", vocab])]
    for i in range(n_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, kv_past))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f32, kv_total))

    graph = helper.make_graph(gr.nodes, "sluice_" + arch, inputs, outputs, gr.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        ir_version=IR_VERSION,
        producer_name="sluice scripts/export_onnx.py",
    )
    hparams = {
        "architecture": arch,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden": hidden,
        "vocab_size": vocab,
        "context_length": context_length,
    }
    return model, hparams, gr


# --------------------------------------------------------------------------
# tokenizer.gguf
# --------------------------------------------------------------------------

def write_metadata_gguf(g: Gguf, path: str) -> int:
    """Copy every key/value of the source GGUF, with its exact type, and no tensors."""
    writer = GGUFWriter(path, g.arch)  # adds general.architecture itself
    copied = 1
    for name, field in g.reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # header fields, rewritten by the writer
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = field.types[-1]
            if len(field.types) != 2:
                raise SystemExit(f"error: nested GGUF array {name!r} is not supported")
            if not field.data:
                print(f"warning: empty array {name!r} cannot be written by gguf; dropped", file=sys.stderr)
                continue
            if sub == GGUFValueType.STRING:
                # Raw bytes, not str: pieces are copied even if not valid UTF-8.
                value = [bytes(field.parts[j]) for j in field.data]
            else:
                value = field.contents()
            writer.add_key_value(name, value, vtype, sub_type=sub)
        elif vtype == GGUFValueType.STRING:
            writer.add_key_value(name, bytes(field.parts[-1]), vtype)
        else:
            writer.add_key_value(name, field.contents(), vtype)
        copied += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return copied


# --------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="source .gguf (llama architecture)")
    ap.add_argument("--out", required=True, help="output directory (created if needed)")
    ap.add_argument("--accuracy-level", type=int, choices=ACCURACY_LEVELS, default=0,
                    help="MatMulNBits compute type: 0 float32, the GGUF's network exactly "
                         "(default); 4 int8 activations, 1.4-1.9x faster decoding, ~0.09 nats "
                         "of noise per logprob, no closer to Sluice's CPU runtime")
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    g = Gguf(args.model)
    model, hparams, gr = build_model(g, args.accuracy_level)
    if gr.fallback:
        print(f"note: dequantized to float32 MatMul: {', '.join(gr.fallback[:5])}"
              f"{' ...' if len(gr.fallback) > 5 else ''}", file=sys.stderr)

    onnx_path = os.path.join(args.out, "model.onnx")
    data_name = "model.onnx.data"
    # save_model appends to an existing external data file; start fresh.
    if os.path.exists(os.path.join(args.out, data_name)):
        os.remove(os.path.join(args.out, data_name))
    onnx.save_model(model, onnx_path, save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data_name)
    # onnx creates the data file owner-only (0600); give it the usual umask mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(os.path.join(args.out, data_name), 0o666 & ~umask)

    n_keys = write_metadata_gguf(g, os.path.join(args.out, "tokenizer.gguf"))

    manifest = {
        "format": FORMAT,
        "source_file": os.path.basename(args.model),
        "source_sha256": sha256_of(args.model),
        **hparams,
        "kv_dtype": "float32",
        "accuracy_level": args.accuracy_level,
        "exporter": "scripts/export_onnx.py",
    }
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")

    print(f"wrote {onnx_path} ({len(model.graph.node)} nodes, accuracy_level {args.accuracy_level}), "
          f"tokenizer.gguf ({n_keys} keys), manifest.json: {hparams['n_layers']} layers, "
          f"vocab {hparams['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
