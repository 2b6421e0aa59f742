#!/usr/bin/env python3
"""Writes a random EAGLE-3 head in the published layout, and runs it as the reference does.

The layout is the one of the EAGLE-3 checkpoints on the Hugging Face Hub (SafeAILab/EAGLE,
`eagle/model/cnets.py`): config.json with "architectures": ["LlamaForCausalLMEagle3"] and
`draft_vocab_size`; tensors `fc.weight` [H, 3H], `midlayer.self_attn.{q,k,v}_proj.weight`
[*, 2H], `midlayer.self_attn.o_proj.weight`, `midlayer.mlp.{gate,up,down}_proj.weight`,
`midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight`, `norm.weight`,
`lm_head.weight` [N, H], `d2t` [N] int64 (target id = i + d2t[i]) and `t2d` [V] bool. No token
embedding: the head borrows the target's.

    make-eagle3-head.py --out DIR --hidden 576 --intermediate 1536 --heads 9 --kv-heads 3 \\
        --vocab 49152 --draft-vocab 4096 [--head-dim D] [--dtype float16] [--seed 0]

With `--reference IN OUT` it also reads rows from IN (JSON: "embeds" [m][H], the token
embeddings; "features" [m][3H], the target's three layers side by side) and writes to OUT the
head's draft logits [m][N] for them as one causal sequence at positions 0..m-1, computed here in
plain Python, step by step as the reference code does (fc, then the midlayer over
[input_layernorm(embedding), hidden_norm(feature)], residual on the feature, then
lm_head(norm(.))). The engine's test compares its own forward with these numbers.

Standard library only, so that it runs wherever python3 does.
"""

import argparse
import json
import math
import os
import random
import struct

DTYPES = {"float16": ("F16", "e", 2), "float32": ("F32", "f", 4)}


def normal_matrix(rng, rows, cols, std=0.02):
    return [[rng.gauss(0.0, std) for _ in range(cols)] for _ in range(rows)]


def near_one(rng, n):
    return [1.0 + rng.gauss(0.0, 0.1) for _ in range(n)]


def roundtrip(values, fmt):
    """The values as the file stores them (f16 rounding), so the reference uses those."""
    return list(struct.unpack(f"<{len(values)}{fmt}", struct.pack(f"<{len(values)}{fmt}", *values)))


def write_safetensors(path, tensors):
    """tensors: name -> (dtype tag, shape, raw bytes)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        tag, shape, raw = tensors[name]
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def make(args):
    rng = random.Random(args.seed)
    h, f, v, n = args.hidden, args.intermediate, args.vocab, args.draft_vocab
    hd = args.head_dim or h // args.heads
    qd, kvd = args.heads * hd, args.kv_heads * hd
    tag, fmt, _ = DTYPES[args.dtype]
    w = {
        "fc.weight": normal_matrix(rng, h, 3 * h, 1.0 / math.sqrt(3 * h)),
        "midlayer.self_attn.q_proj.weight": normal_matrix(rng, qd, 2 * h, 1.0 / math.sqrt(2 * h)),
        "midlayer.self_attn.k_proj.weight": normal_matrix(rng, kvd, 2 * h, 1.0 / math.sqrt(2 * h)),
        "midlayer.self_attn.v_proj.weight": normal_matrix(rng, kvd, 2 * h, 1.0 / math.sqrt(2 * h)),
        "midlayer.self_attn.o_proj.weight": normal_matrix(rng, h, qd, 1.0 / math.sqrt(qd)),
        "midlayer.mlp.gate_proj.weight": normal_matrix(rng, f, h, 1.0 / math.sqrt(h)),
        "midlayer.mlp.up_proj.weight": normal_matrix(rng, f, h, 1.0 / math.sqrt(h)),
        "midlayer.mlp.down_proj.weight": normal_matrix(rng, h, f, 1.0 / math.sqrt(f)),
        "midlayer.input_layernorm.weight": near_one(rng, h),
        "midlayer.hidden_norm.weight": near_one(rng, h),
        "midlayer.post_attention_layernorm.weight": near_one(rng, h),
        "norm.weight": near_one(rng, h),
        "lm_head.weight": normal_matrix(rng, n, h, 1.0 / math.sqrt(h)),
    }
    tensors, stored = {}, {}
    for name, t in w.items():
        if isinstance(t[0], list):
            flat = roundtrip([x for row in t for x in row], fmt)
            cols = len(t[0])
            stored[name] = [flat[i * cols:(i + 1) * cols] for i in range(len(t))]
            shape = [len(t), cols]
        else:
            flat = roundtrip(t, fmt)
            stored[name] = flat
            shape = [len(t)]
        tensors[name] = (tag, shape, struct.pack(f"<{len(flat)}{fmt}", *flat))
    used = sorted(rng.sample(range(v), n))
    d2t = [t - i for i, t in enumerate(used)]
    tensors["d2t"] = ("I64", [n], struct.pack(f"<{n}q", *d2t))
    in_draft = set(used)
    tensors["t2d"] = ("BOOL", [v], bytes(1 if i in in_draft else 0 for i in range(v)))
    os.makedirs(args.out, exist_ok=True)
    write_safetensors(os.path.join(args.out, "model.safetensors"), tensors)
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": f,
        "num_hidden_layers": 1,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": hd,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": 2048,
        "vocab_size": v,
        "draft_vocab_size": n,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": args.dtype,
    }
    if args.aux_layers:
        config["eagle_config"] = {
            "eagle_aux_hidden_state_layer_ids": [int(x) for x in args.aux_layers.split(",")]
        }
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    return stored, config, used


# The reference forward, in plain Python.

def matvec(m, x):
    return [sum(a * b for a, b in zip(row, x)) for row in m]


def rms_norm(x, w, eps):
    s = 1.0 / math.sqrt(sum(a * a for a in x) / len(x) + eps)
    return [a * s * g for a, g in zip(x, w)]


def rope(vec, heads, hd, pos, theta):
    """HF LLaMA's rotate-half RoPE on `heads` heads of width hd."""
    out = list(vec)
    half = hd // 2
    for hh in range(heads):
        base = hh * hd
        for i in range(half):
            ang = pos * theta ** (-2.0 * i / hd)
            c, s = math.cos(ang), math.sin(ang)
            a, b = vec[base + i], vec[base + half + i]
            out[base + i] = a * c - b * s
            out[base + half + i] = b * c + a * s
    return out


def silu(x):
    return x / (1.0 + math.exp(-x))


def reference(w, config, embeds, features):
    eps, theta = config["rms_norm_eps"], config["rope_theta"]
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    group = nh // nkv
    m = len(embeds)
    hidden = [matvec(w["fc.weight"], f) for f in features]  # fc: 3H -> H, no bias
    qs, ks, vs = [], [], []
    for t in range(m):
        e = rms_norm(embeds[t], w["midlayer.input_layernorm.weight"], eps)
        x = rms_norm(hidden[t], w["midlayer.hidden_norm.weight"], eps)
        a = e + x  # [embedding, feature]: embedding first
        qs.append(rope(matvec(w["midlayer.self_attn.q_proj.weight"], a), nh, hd, t, theta))
        ks.append(rope(matvec(w["midlayer.self_attn.k_proj.weight"], a), nkv, hd, t, theta))
        vs.append(matvec(w["midlayer.self_attn.v_proj.weight"], a))
    logits = []
    for t in range(m):
        ctx = []
        for hh in range(nh):
            kv = hh // group
            q = qs[t][hh * hd:(hh + 1) * hd]
            scores = [sum(a * b for a, b in zip(q, ks[j][kv * hd:(kv + 1) * hd])) / math.sqrt(hd)
                      for j in range(t + 1)]
            top = max(scores)
            p = [math.exp(s - top) for s in scores]
            z = sum(p)
            ctx.extend(sum(p[j] / z * vs[j][kv * hd + d] for j in range(t + 1)) for d in range(hd))
        y = [r + o for r, o in zip(hidden[t], matvec(w["midlayer.self_attn.o_proj.weight"], ctx))]
        n2 = rms_norm(y, w["midlayer.post_attention_layernorm.weight"], eps)
        g = matvec(w["midlayer.mlp.gate_proj.weight"], n2)
        u = matvec(w["midlayer.mlp.up_proj.weight"], n2)
        y = [r + d for r, d in zip(y, matvec(w["midlayer.mlp.down_proj.weight"],
                                             [silu(a) * b for a, b in zip(g, u)]))]
        logits.append(matvec(w["lm_head.weight"], rms_norm(y, w["norm.weight"], eps)))
    return logits


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--intermediate", type=int, required=True)
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--kv-heads", type=int, required=True)
    p.add_argument("--head-dim", type=int, default=0)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--draft-vocab", type=int, required=True)
    p.add_argument("--rms-norm-eps", type=float, default=1e-5)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--aux-layers", default="", help="eagle_config's layer ids a,b,c (optional)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", nargs=2, metavar=("IN", "OUT"))
    args = p.parse_args()
    stored, config, _ = make(args)
    if args.reference:
        with open(args.reference[0]) as fh:
            rows = json.load(fh)
        out = reference(stored, config, rows["embeds"], rows["features"])
        with open(args.reference[1], "w") as fh:
            json.dump({"logits": out}, fh)


if __name__ == "__main__":
    main()
