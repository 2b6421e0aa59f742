#!/usr/bin/env python3
"""Per-rank memory plan for tensor-parallel serving of the large EAGLE targets.

Prints the Markdown tables in docs/memory-plan.md. Usage:

    python3 docs/memory_plan.py                          # print the tables
    python3 docs/memory_plan.py --check docs/memory-plan.md   # fail if the doc's tables differ

The shapes are those of services/engine/tests/data/configs/*.json (the test
tests/config_fixtures.rs proves the engine parses them to these numbers).

Byte model (as the engine holds a model loaded in bf16):
  * every weight matrix (projections, experts, router, embedding, LM head): 2 bytes per entry;
  * vectors (RMSNorm weights, Qwen2's q/k/v biases, the EAGLE fc bias): 4 bytes per entry,
    because the engine keeps them in f32;
  * KV cache: bf16, K and V, every layer.
Tensor-parallel split (Megatron style):
  * attention: q/k/v column-split by heads, o_proj row-split by heads; when TP exceeds the
    KV heads, each rank holds one KV head (replicated TP/kv times);
  * MLP: gate/up column-split, down row-split, by intermediate; each Mixtral expert is split
    the same way on every rank (not expert-parallel); the router is replicated;
  * norms replicated; embedding and LM head either replicated or vocab-parallel (rows split).
EAGLE heads: EAGLE-1/2 (fc 2H->H with a bias, one layer, the target's LM head) and EAGLE-3
(fc 3H->H without a bias, one layer whose q/k/v read 2H, three more norms, its own LM head
over a reduced draft vocabulary). Their features travel as bf16 rows, H values per token for
EAGLE-1/2 and 3H for EAGLE-3 (three target layers side by side).
"""

import sys
from dataclasses import dataclass

BF16 = 2
F32 = 4
GIB = 1 << 30
TPS = (2, 4, 8)


@dataclass
class Model:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    qkv_bias: bool = False
    experts: int = 0  # 0: dense MLP

    @property
    def head_dim(self):
        return self.hidden // self.heads


MODELS = [
    Model("LLaMA-2-70B", 8192, 80, 64, 8, 28672, 32000),
    Model("LLaMA-3-70B", 8192, 80, 64, 8, 28672, 128256),
    Model("Qwen2-72B", 8192, 80, 64, 8, 29568, 152064, qkv_bias=True),
    Model("Mixtral-8x7B", 4096, 32, 32, 8, 14336, 32000, experts=8),
]

# Memory a process can use: what the driver reports, less about 1 GiB of CUDA context,
# cuBLAS and NCCL buffers.
GPUS = [
    ("A100 40GB", 40.0 - 1.0),
    ("A100 80GB", 80.0 - 1.0),
    ("H100 80GB", 81559 / 1024 - 1.0),
    ("H200 141GB", 143771 / 1024 - 1.0),
]
WORKSPACE = 0.10  # share of usable memory kept for activations and workspace
MIN_KV_TOKENS = 32 * 1024  # "fits" means at least this many tokens of KV (e.g. 8 x 4k)
DRAFT_VOCAB = 32000  # a reduced draft vocabulary's own LM head


def kv_heads_per_rank(m, tp):
    if m.kv_heads % tp == 0:
        return m.kv_heads // tp
    if tp % m.kv_heads == 0:
        return 1  # replicated tp / kv_heads times
    raise ValueError(f"{m.name}: {m.kv_heads} KV heads do not split over {tp}")


def kv_note(m, tp):
    if tp > m.kv_heads:
        return f"replicated x{tp // m.kv_heads}"
    return "split, no replication"


def decoder_layer_bytes(m, tp, input_norm=True, dense=False, attn_in=None):
    """One decoder layer's bytes on one rank (tp=1: the whole layer).

    attn_in: the width q/k/v read (default the hidden size; 2H for an EAGLE-3 head's layer).
    """
    h, hd = m.hidden, m.head_dim
    a = attn_in or h
    assert m.heads % tp == 0 and m.intermediate % tp == 0
    q = m.heads // tp * hd
    kv = kv_heads_per_rank(m, tp) * hd
    b = BF16 * (a * q + 2 * a * kv + q * h)  # q, k, v, o
    if m.qkv_bias:
        b += F32 * (q + 2 * kv)
    mlp = BF16 * 3 * h * (m.intermediate // tp)  # gate, up, down
    if m.experts and not dense:
        b += m.experts * mlp + BF16 * h * m.experts  # experts + replicated router
    else:
        b += mlp
    b += F32 * h * (2 if input_norm else 1)  # RMSNorm weights
    return b


def embed_bytes(m, tp, vocab_parallel):
    rows = -(-m.vocab // tp) if vocab_parallel else m.vocab
    return BF16 * rows * m.hidden


def weights_bytes(m, tp, vocab_parallel):
    """Target weights on one rank: layers, final norm, embedding and (untied) LM head."""
    return (
        m.layers * decoder_layer_bytes(m, tp)
        + F32 * m.hidden
        + 2 * embed_bytes(m, tp, vocab_parallel)
    )


def eagle_head_bytes(m, tp=1):
    """EAGLE head: fc 2H->H (+ f32 bias) and one decoder layer without an input norm.

    Its layer is dense with the target's intermediate width (for Mixtral too, as the published
    Mixtral head is). Embedding and LM head are borrowed from the target.
    """
    h = m.hidden
    fc = BF16 * 2 * h * h // tp + F32 * h
    return fc + decoder_layer_bytes(m, tp, input_norm=False, dense=True)


def eagle3_head_bytes(m, tp=1):
    """EAGLE-3 head: fc 3H->H (no bias) and one decoder layer (`midlayer`) whose q/k/v read 2H.

    The layer is split like eagle_head_bytes'; its input_layernorm (on the embedding) is
    counted, and so are the head's two other norms, hidden_norm (on the feature) and the
    output norm, all replicated. The own LM head is not included (draft_lm_head_bytes).
    """
    h = m.hidden
    fc = BF16 * 3 * h * h // tp
    layer = decoder_layer_bytes(m, tp, input_norm=True, dense=True, attn_in=2 * h)
    return fc + layer + F32 * 2 * h


def draft_lm_head_bytes(m):
    """A head's own LM head over DRAFT_VOCAB rows, replicated (d2t / t2d, under 1 MB, left out)."""
    return BF16 * DRAFT_VOCAB * m.hidden


def feature_bytes_per_token(m, layers):
    """Target features per token on the wire (bf16): H values per target layer sent."""
    return layers * m.hidden * BF16


def kv_bytes_per_token(m, tp):
    return 2 * m.layers * kv_heads_per_rank(m, tp) * m.head_dim * BF16


def head_kv_bytes_per_token(m):
    return 2 * m.kv_heads * m.head_dim * BF16  # one layer, head replicated on each rank


def gib(b):
    return f"{b / GIB:.2f}"


def gb(b):
    return f"{b / 1e9:.2f}"


def params(m):
    """Parameter count (entries, not bytes) of the whole target."""
    h, hd = m.hidden, m.head_dim
    attn = h * m.heads * hd * 2 + h * m.kv_heads * hd * 2
    if m.qkv_bias:
        attn += m.heads * hd + 2 * m.kv_heads * hd
    mlp = 3 * h * m.intermediate
    if m.experts:
        mlp = m.experts * mlp + h * m.experts
    return m.layers * (attn + mlp + 2 * h) + h + 2 * m.vocab * h


def fit(m, tp, cap, vocab_parallel=True, head_bytes=None):
    """(verdict, KV tokens left) for model m at TP degree tp on a GPU of cap GiB: `no` if the
    weights and the head (the EAGLE-1/2 head unless head_bytes) do not fit, `ok` with at least
    MIN_KV_TOKENS of KV room, else `tight`."""
    usable = cap * GIB * (1 - WORKSPACE)
    head = eagle_head_bytes(m) if head_bytes is None else head_bytes
    left = usable - weights_bytes(m, tp, vocab_parallel) - head
    toks = left / (kv_bytes_per_token(m, tp) + head_kv_bytes_per_token(m))
    return ("no" if left <= 0 else ("ok" if toks >= MIN_KV_TOKENS else "tight"), max(toks, 0))


def verdict_changes(a, b):
    """Rows [model, TP, GPU, a's cell, b's cell] where two fits (functions of model, TP and GPU
    capacity) give different verdicts."""
    rows = []
    for m in MODELS:
        for tp in TPS:
            for g, cap in GPUS:
                va, vb = a(m, tp, cap), b(m, tp, cap)
                if va[0] != vb[0]:
                    rows.append([m.name, tp, g, verdict_cell(*va), verdict_cell(*vb)])
    return rows


def verdict_cell(verdict, toks):
    return "no" if verdict == "no" else f"{verdict} {toks / 1000:.0f}k"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def render():
    L = []
    L += ["### Models", ""]
    L += table(
        ["model", "params", "bf16 total GiB", "embedding + LM head GiB (both)", "per layer MiB"],
        [
            [
                m.name,
                f"{params(m) / 1e9:.2f} B",
                gib(weights_bytes(m, 1, False)),
                gib(2 * embed_bytes(m, 1, False)),
                f"{decoder_layer_bytes(m, 1) / (1 << 20):.1f}",
            ]
            for m in MODELS
        ],
    )

    L += ["", "### Target weights per rank (GiB; exact bytes in brackets)", ""]
    rows = []
    for m in MODELS:
        for tp in TPS:
            rep = weights_bytes(m, tp, False)
            vp = weights_bytes(m, tp, True)
            rows.append(
                [
                    m.name,
                    tp,
                    f"{gib(rep)} ({rep:,})",
                    f"{gib(vp)} ({vp:,})",
                    gib(rep - vp),
                ]
            )
    L += table(
        ["model", "TP", "embedding + LM head replicated", "vocab-parallel", "saved by vocab-parallel"],
        rows,
    )

    L += ["", "### KV cache per 1,000 tokens of context, per rank (bf16, K and V, all layers)", ""]
    rows = []
    for m in MODELS:
        for tp in TPS:
            kv = 1000 * kv_bytes_per_token(m, tp)
            rows.append(
                [
                    m.name,
                    tp,
                    f"{kv_heads_per_rank(m, tp)} of {m.kv_heads}",
                    kv_note(m, tp),
                    f"{kv / 1e6:.2f} MB ({kv / (1 << 20):.2f} MiB)",
                ]
            )
    # One line beyond the plan, to show the replicated case the formula handles.
    m = MODELS[0]
    kv = 1000 * kv_bytes_per_token(m, 16)
    rows.append(
        [
            f"{m.name} (illustration)",
            16,
            f"{kv_heads_per_rank(m, 16)} of {m.kv_heads}",
            kv_note(m, 16),
            f"{kv / 1e6:.2f} MB ({kv / (1 << 20):.2f} MiB)",
        ]
    )
    L += table(["model", "TP", "KV heads per rank", "KV heads across ranks", "per 1k tokens per rank"], rows)

    L += ["", "### EAGLE head (bf16)", ""]
    rows = []
    for m in MODELS:
        head = eagle_head_bytes(m)
        lm = BF16 * DRAFT_VOCAB * m.hidden
        rows.append(
            [
                m.name,
                f"{head / 1e6:.1f} MB ({head:,})",
                f"{eagle_head_bytes(m, 8) / 1e6:.1f} MB",
                f"{1000 * head_kv_bytes_per_token(m) / 1e6:.2f} MB",
                f"{lm / 1e6:.1f} MB"
                + (" (same as target's)" if m.vocab == DRAFT_VOCAB else f" (target's: {BF16 * m.vocab * m.hidden / 1e6:.1f} MB)"),
            ]
        )
    L += table(
        [
            "target",
            "head, replicated (fc + 1 layer)",
            "head, TP 8 split",
            "head KV per 1k tokens",
            f"own LM head for a {DRAFT_VOCAB // 1000}k draft vocab",
        ],
        rows,
    )

    L += ["", "### EAGLE-3 head (bf16; always with its own LM head)", ""]
    rows = []
    for m in MODELS:
        head = eagle3_head_bytes(m)
        lm = draft_lm_head_bytes(m)
        rows.append(
            [
                m.name,
                f"{head / 1e6:.1f} MB ({head:,})",
                f"{eagle3_head_bytes(m, 8) / 1e6:.1f} MB",
                f"{1000 * head_kv_bytes_per_token(m) / 1e6:.2f} MB",
                f"{lm / 1e6:.1f} MB ({lm:,})",
                f"{(head + lm) / 1e6:.1f} MB ({head + lm:,})",
            ]
        )
    L += table(
        [
            "target",
            "head, replicated (fc 3H->H + midlayer)",
            "head, TP 8 split",
            "head KV per 1k tokens",
            f"own LM head, {DRAFT_VOCAB // 1000}k draft vocab",
            "total, replicated (head + own LM head)",
        ],
        rows,
    )

    L += ["", "### Features per token (bf16 on the wire; the worker keeps a host copy per session)", ""]
    rows = []
    for m in MODELS:
        row = [m.name, m.hidden]
        per_tok = [feature_bytes_per_token(m, n) for n in (1, 3)]
        row += [f"{b:,} B ({b / 1024:.0f} KiB)" for b in per_tok]
        row += [f"{1000 * b / 1e6:.2f} MB ({1000 * b:,})" for b in per_tok]
        rows.append(row)
    L += table(
        [
            "target",
            "H",
            "EAGLE-1/2 per token (H x 2)",
            "EAGLE-3 per token (3H x 2)",
            "host copy per 1k tokens, EAGLE-1/2",
            "host copy per 1k tokens, EAGLE-3",
        ],
        rows,
    )

    L += [
        "",
        f"### What fits: KV tokens left per rank (thousands), vocab-parallel embedding + LM head,"
        f" EAGLE-1/2 head replicated, {int(WORKSPACE * 100)}% kept for activations",
        "",
        f"Cell: tokens of KV room (target + head KV), summed over all sequences. "
        f"`ok` at least {MIN_KV_TOKENS // 1024}k, `tight` below that, `no` if the weights do not fit.",
        "",
    ]
    header = ["model", "TP"] + [f"{g} ({c:.1f} GiB usable)" for g, c in GPUS]
    rows = []
    for m in MODELS:
        for tp in TPS:
            rows.append([m.name, tp] + [verdict_cell(*fit(m, tp, cap)) for _, cap in GPUS])
    L += table(header, rows)

    L += ["", "Replicated embedding + LM head instead (only where the verdict changes):", ""]
    rows = verdict_changes(fit, lambda m, tp, cap: fit(m, tp, cap, vocab_parallel=False))
    L += table(["model", "TP", "GPU", "vocab-parallel", "replicated"], rows) if rows else ["(none)"]

    L += [
        "",
        f"EAGLE-3 head with its own {DRAFT_VOCAB // 1000}k LM head instead, replicated, vocab-parallel"
        f" target (only where the verdict changes):",
        "",
    ]
    rows = verdict_changes(
        fit,
        lambda m, tp, cap: fit(m, tp, cap, head_bytes=eagle3_head_bytes(m) + draft_lm_head_bytes(m)),
    )
    L += table(["model", "TP", "GPU", "EAGLE-1/2", "EAGLE-3"], rows) if rows else ["(none)"]

    L += [
        "",
        "### All-reduce per verification step (n tokens; two all-reduces of n x hidden bf16 per layer)",
        "",
    ]
    rows = []
    for m in (MODELS[0], MODELS[3]):
        for n in (1, 16, 64):
            per_layer = 2 * n * m.hidden * BF16
            step = per_layer * m.layers
            ring = {tp: step * 2 * (tp - 1) / tp for tp in TPS}
            rows.append(
                [
                    f"{m.name} (H {m.hidden}, {m.layers} layers)",
                    n,
                    f"{per_layer:,} B ({per_layer / 1024:.0f} KiB)",
                    f"{step / (1 << 20):.2f} MiB",
                    " / ".join(f"{ring[tp] / (1 << 20):.2f}" for tp in TPS),
                ]
            )
    L += table(
        [
            "shape",
            "n",
            "payload per layer",
            "payload per step",
            "ring traffic per rank per step, MiB (TP 2 / 4 / 8)",
        ],
        rows,
    )
    return L


BEGIN = "<!-- BEGIN memory_plan.py output -->"
END = "<!-- END memory_plan.py output -->"


def main():
    text = "\n".join(render())
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        doc = open(sys.argv[2]).read()
        try:
            inside = doc.split(BEGIN, 1)[1].split(END, 1)[0].strip()
        except IndexError:
            sys.exit(f"{sys.argv[2]}: no {BEGIN} ... {END} block")
        if inside != text.strip():
            sys.exit(f"{sys.argv[2]}: tables differ from this script's output; regenerate")
        print("doc tables match")
        return
    print(text)


if __name__ == "__main__":
    main()
