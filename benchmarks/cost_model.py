"""Memory and step-cost model of AdamW and POET on LLaMA shapes: what fits on one 80 GB GPU and on 8 with FSDP2.

    python benchmarks/cost_model.py                 # every preset + an 8B LLaMA shape, GPU (bf16 autocast)
    python benchmarks/cost_model.py --validate      # the model on CPU (fp32) next to step.py's measured bytes

Bytes are counted tensor by tensor from what the code keeps (docs/benchmarks.md, "Memory and cost model",
lists every term); nothing is fitted to measurements. Block layouts come from poetlm's own `block_layout`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from common import markdown_table
from poetlm import POETConfig
from poetlm.primitives import GPU_CHUNK_ENTRIES, block_layout
from poetlm.train.config import PAPER_NEUMANN_TERMS, resolve_config

GIB = 2**30
MIB = 2**20
GPU_BYTES = 81559 * MIB  # what nvidia-smi reports for an 80 GB H100 / A100
USABLE = 0.9             # the rest: CUDA context, NCCL buffers, allocator fragmentation
FSDP_WORLD = 8
PRESETS = ["tiny", "small", "llama-60m", "llama-130m", "llama-350m", "llama-1b", "llama-3b"]
NEUMANN_TERMS = PAPER_NEUMANN_TERMS              # poet-paper's k (the paper's recipe)
FOLD_NEUMANN_TERMS = POETConfig.neumann_terms    # poet's k (POETConfig's default)


def cnp_products(terms: int) -> int:
    """b×b products of one Cayley–Neumann map with k terms (orthogonal.cayley_neumann_increment): 2 at k=3,
    3 at k=4 (Paterson–Stockmeyer), k by Horner's rule otherwise. Q itself is laid out by a gather, no product."""
    return terms - 1 if terms in (3, 4) else terms


def cnp_build_macs(terms: int, cube: int, forwards: int = 1) -> int:
    """Multiply-adds of the layer form's Cayley–Neumann maps over blocks with Σ n_blocks·b³ = `cube`:
    `forwards` runs of the map and one backward through it (two products per product)."""
    return (forwards + 2) * cnp_products(terms) * cube


ORTHOGONALIZE_MACS = 12  # per b³ and active block: 4 quintic Newton–Schulz steps of 3 products (the default on GPUs)
FOLD_EXACT_PRODUCTS = 12  # POET's exact orthogonalization: Gram, eigh (~9 b³), two products


def fold_block_products(orthogonalizer: str, terms: int) -> int:
    """b×b products per block of the fold form's turning side: the orthogonalization and the map."""
    if orthogonalizer == "newton_schulz":
        return ORTHOGONALIZE_MACS + cnp_products(terms)
    return FOLD_EXACT_PRODUCTS + 1  # exact directions: the map's closed form is one product


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int   # sequences per micro-batch
    seq: int
    accum: int   # micro-batches per optimizer step
    tied: bool = False

    @property
    def kv(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    def linears(self) -> list[tuple[int, int]]:
        """(out, in) of one block's q, k, v, o, gate, up, down."""
        d, f, kv = self.hidden, self.intermediate, self.kv
        return [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]

    def with_micro_batch(self, batch: int, seq: int, accum: int) -> "Shape":
        return dataclasses.replace(self, batch=batch, seq=seq, accum=accum)


LLAMA_8B = Shape("8B (LLaMA-3 shape)", 4096, 14336, 32, 32, 8, 128256, batch=1, seq=8192, accum=16)


def preset_shape(preset: str) -> Shape:
    c = resolve_config(preset)
    m = c.model
    return Shape(preset, m.hidden_size, m.intermediate_size, m.num_layers, m.num_heads, m.num_kv_heads or m.num_heads,
                 c.data.vocab_size, c.batch_size, c.data.seq_len, c.grad_accum, m.tie_embeddings)


@dataclasses.dataclass(frozen=True)
class Method:
    key: str
    label: str
    kind: str            # adamw | poet (fold form, the POET optimizer) | paper (POETLinear layers)
    variant: str = "bs"
    block: int = 256
    fraction: float = 0.5


METHODS = [Method("adamw", "AdamW", "adamw"),
           Method("poet-b256", "POET bs b=256", "poet"), Method("poet-fs", "POET fs β=½", "poet", "fs"),
           Method("paper-b256", "POET-paper bs b=256", "paper"), Method("paper-fs", "POET-paper fs β=½", "paper", "fs")]


def sides(method: Method, out: int, inp: int) -> list[tuple[int, int, list[int]]]:
    """(dim, slot size b, block sizes) of the output and input side of an out×in weight."""
    return [(dim, *block_layout(method.variant, dim, method.block, method.fraction)) for dim in (out, inp)]


@dataclasses.dataclass
class Counts:
    """Element counts of a model under one method."""

    block: int        # block-linear weight entries (W0 under poet-paper)
    other: int        # embeddings, head, norms
    head: int
    largest_layer: int  # largest single block linear
    block_layer: int    # all linears of one block
    rotation: int     # poet-paper: skew parameters; poet: 0
    slots: int        # Σ n_blocks·b² over sides (padded blocks): POET's momentum, one CNP intermediate set
    cube: int         # Σ n_blocks·b³ over sides
    index: int        # int64 coordinate entries kept (paper: index + inverse for bs; poet: optimizer's index)
    spectrum: int     # Σ min(out, in): initial singular values kept for the drift diagnostic
    probe: int        # poet-paper: probe, probe_rotated (Σ in) per layer
    rotate_macs: int  # rotating one side of every block linear (out·in·b for bs), averaged over the two sides
    stacked: int      # entries of one stacked chunk of same-shaped weights on a GPU (poet's optimizer)


def counts(shape: Shape, method: Method) -> Counts:
    d, v = shape.hidden, shape.vocab
    head = 0 if shape.tied else v * d
    other = v * d + head + (2 * shape.layers + 1) * d
    block = rotation = slots = cube = index = spectrum = probe = macs = 0
    for out, inp in shape.linears():
        block += out * inp
        spectrum += min(out, inp)
        probe += 2 * inp
        for dim, slot, sizes in sides(method, out, inp):
            rotation += sum(s * (s - 1) // 2 for s in sizes)
            slots += len(sizes) * slot ** 2
            cube += len(sizes) * slot ** 3
            # poet-paper: index and its inverse (bs) or the subset (fs); poet: the optimizer's index
            index += 2 * dim if method.kind == "paper" and method.variant == "bs" else sum(sizes)
            macs += (out * inp // dim) * sum(s * s for s in sizes)  # rotating the other dimension's vectors
    per_layer = max(o * i for o, i in shape.linears())
    layer_total = sum(o * i for o, i in shape.linears())
    n = shape.layers
    shapes = [(o, i) for o, i in shape.linears()]
    # poetlm.optim stacks a shape's weights in chunks of at most GPU_CHUNK_ENTRIES entries (one weight if larger)
    stacked = max(max(o * i, min(GPU_CHUNK_ENTRIES // (o * i), n * shapes.count((o, i))) * o * i) for o, i in shapes)
    return Counts(n * block, other, head, per_layer, layer_total, n * rotation, n * slots, n * cube,
                  n * index, n * spectrum, n * probe, n * macs // 2, stacked)


def activation_bytes(shape: Shape, c: Counts, bf16: bool, checkpointing: bool) -> dict[str, int]:
    """Bytes one micro-batch keeps for backward, and the loss's transient V-sized tensors.

    Per block and token (HF LLaMA, SDPA attention): two RMSNorms keep their input and normalized input;
    attention keeps q and k after RoPE, v, its output and the output reshaped for o_proj; the MLP keeps
    gate, silu(gate), up and their product. fp32 (CPU): each norm's output once more (the linears read
    it): 9d + 2kv + 4ff floats. bf16 autocast (GPU): norms in fp32 (4d floats), every linear keeps its own
    bf16 copy of its input (q, k, v and gate, up each cast the norm's output), attention runs in bf16:
    8d + 2kv + 4ff bf16 values; and every matmul weight is cast to bf16 once per micro-batch and kept.
    Checkpointing keeps each block's input (the fp32 residual) and, while one block is recomputed in
    backward, that block's full set; by then the loss's tensors are gone.
    """
    d, kv, f, tokens = shape.hidden, shape.kv, shape.intermediate, shape.batch * shape.seq
    small = 4 * (2 + shape.heads)  # two rsqrt, the attention's logsumexp per head
    per_layer = tokens * ((16 * d + 2 * (8 * d + 2 * kv + 4 * f) if bf16 else 4 * (9 * d + 2 * kv + 4 * f)) + small)
    copies = 2 * c.block_layer if bf16 else 0  # every block weight cast to bf16 once per micro-batch and kept
    return {"kept": shape.layers * (tokens * 4 * d if checkpointing else per_layer + copies),
            "recompute": per_layer + copies if checkpointing else 0,
            # Final norm (and the head's input), log-softmax, token ids; the head's bf16 weight copy.
            "final": tokens * ((8 * d + 2 * d if bf16 else 12 * d) + 4 * shape.vocab + 8) + (2 * c.head if bf16 else 0),
            # Entering backward: the log-softmax's output gradient and the logits' (fp32; under autocast the
            # first is freed before the logits' gradient is cast to bf16).
            "loss_transient": tokens * shape.vocab * 8}


def adam_transient(shape: Shape, c: Counts, method: Method, gpu: bool, sharded: bool) -> int:
    """Temporaries of torch's AdamW step over the parameters it holds (decayed matrices in one group).

    `poetlm.optim.adamw` takes the fused form, which has none, for plain parameters on a CPU or GPU; FSDP2's
    sharded ones get foreach (torch's CUDA default; on CPU where no group is larger than three of its
    largest parameter): √v of a whole group at once, or else (one tensor at a time) √v and √v/c of the
    current tensor while the previous tensor's denominator is still referenced.
    """
    if not sharded:
        return 0
    if method.kind == "adamw":  # embedding, every block matrix, head: one group, in model order
        order = [shape.vocab * shape.hidden] + [o * i for o, i in shape.linears()] + ([] if shape.tied else [c.head])
        group = c.block + c.other
    else:  # the rotations (poet-paper) are their own group; the decayed group is the embedding and head
        order = [shape.vocab * shape.hidden] + ([] if shape.tied else [c.head])
        group = max(c.rotation, shape.vocab * shape.hidden + c.head)
    if gpu or group <= 3 * max(order):
        return 4 * group
    return 4 * max(2 * order[0], *(prev + 2 * cur for prev, cur in zip(order, order[1:])))


def model_bytes(shape: Shape, method: Method, gpu: bool, world: int, checkpointing: bool, bf16: bool | None = None) -> dict:
    """Per-process bytes of one optimizer step at the shape's micro-batch (accumulation as the shape's).

    gpu: CUDA's batching of POET's chunks; bf16: autocast (default: on a GPU, as the loop's dtype=auto).
    """
    bf16 = gpu if bf16 is None else bf16
    c = counts(shape, method)
    shard = world  # FSDP2 shards parameters, gradients and optimizer state alike
    total_params = c.block + c.other
    if method.kind == "paper":
        weights = 4 * (c.block + c.rotation + c.other)
        buffers = 8 * c.index + 4 * (c.probe + c.spectrum)
        grads = 4 * (c.rotation + c.other)
        state = 8 * (c.rotation + c.other)
    else:
        weights, buffers, grads = 4 * total_params, 0, 4 * total_params
        if method.kind == "adamw":
            state = 8 * total_params
        else:  # packed momentum (b(b−1)/2 per block and side), initial spectrum and coordinates per weight,
            # whole on every rank under FSDP (each rank rotates whole weights); AdamW on the rest, sharded
            rotation_state = 2 * c.slots + 4 * c.spectrum + 8 * c.index
            state = rotation_state * shard + 8 * c.other
    weights, buffers, grads, state = (x // shard for x in (weights, buffers, grads, state))
    acts = activation_bytes(shape, c, bf16, checkpointing)
    cache = 0
    if method.kind == "paper" and world == 1:
        cache = 8 * c.block  # step_weight_cache: every effective weight and its gradient, fp32
    elif method.kind == "paper":  # FSDP2: no cache; each micro-batch builds inside the block, graph kept
        build_graph = 8 * c.block_layer + 4 * (NEUMANN_TERMS + 2) * c.slots // shape.layers
        acts["recompute" if checkpointing else "kept"] += build_graph * (1 if checkpointing else shape.layers)
    activations = acts["kept"] + acts["recompute"] + acts["final"]
    fsdp = 12 * c.block_layer if world > 1 else 0  # the current and the prefetched block gathered, one block's grads
    if method.kind == "poet":
        # The POET optimizer steps first, one weight at a time (its gathered rows, gradient rows and their
        # block product; under FSDP also the whole weight and gradient), then drops the block gradients;
        # AdamW then updates the rest.
        gathered = 8 * c.largest_layer if world > 1 else 0
        # On one GPU a chunk goes stacked: its weights, their gathered rows and the rotated rows at once.
        rows = 12 * c.stacked if gpu and world == 1 else 8 * c.largest_layer
        optimizer = max(grads + gathered + rows + 4 * c.slots // (7 * shape.layers),
                        4 * c.other // shard + adam_transient(shape, c, method, gpu, world > 1) // shard)
    else:
        optimizer = grads + adam_transient(shape, c, method, gpu, world > 1) // shard
    live_grads = grads if shape.accum > 1 else 4 * c.head // shard  # accum 1: the head's is the first one made
    live_cache = cache if shape.accum > 1 else cache // 2           # the cache's gradients appear in backward too
    backward = acts["kept"] + max(acts["final"] + acts["loss_transient"], acts["recompute"]) + live_grads + live_cache + fsdp
    rebuild = grads + cache + 12 * c.largest_layer if method.kind == "paper" and world == 1 else 0
    in_step = max(backward, grads + cache + fsdp, rebuild, optimizer)
    static = weights + buffers + state
    return {"weights": weights + buffers, "grads": grads, "state": state, "cache": cache, "activations": activations,
            "in_step": in_step, "static": static, "peak": static + in_step}


def step_flops(shape: Shape, method: Method, checkpointing: bool, world: int = 1) -> tuple[float, float]:
    """(6·N·T-style model flops per optimizer step, the method's extra flops) for one process's tokens."""
    c = counts(shape, method)
    tokens = shape.batch * shape.seq * shape.accum
    attention = shape.layers * shape.hidden * shape.seq  # QKᵀ and A·V over seq/2 keys on average, per token
    macs = 3 * (c.block + c.head + attention) * tokens
    if checkpointing:
        macs += (c.block + attention) * tokens
    extra = 0
    if method.kind == "poet":
        # Skew gradients of both sides (one weight-sized product each) and the rotation of the active
        # side; per block of the active side, the rule's orthogonalization and the map's products.
        extra = 3 * c.rotate_macs + fold_block_products("newton_schulz", FOLD_NEUMANN_TERMS) * c.cube // 2
    elif method.kind == "paper":
        # A build rotates both sides (2 rotations) and runs CNP's block products per side; its backward
        # costs 1× for W0's side (W0 is frozen), 2× for the other, and twice CNP's products. A cached step
        # builds twice (no grad, then with grad for the backward); under FSDP each micro-batch builds once
        # and, with checkpointing, once more in the recompute.
        cached = world == 1
        forwards = 2 if cached else 1 + checkpointing
        builds = 1 if cached else shape.accum
        extra = builds * ((2 * forwards + 3) * c.rotate_macs + cnp_build_macs(NEUMANN_TERMS, c.cube, forwards))
    return 2.0 * macs, 2.0 * extra


def gib(n: int) -> str:
    return f"{n / GIB:.1f}" if n >= GIB / 10 else f"{n / GIB:.2f}"


def fits(peak: int) -> str:
    return "yes" if peak <= USABLE * GPU_BYTES else "no"


def shapes() -> list[Shape]:
    return [preset_shape(p) for p in PRESETS] + [LLAMA_8B]


def gpu_tables() -> str:
    lines = [f"GPU: bf16 autocast, fp32 master weights, {GPU_BYTES / GIB:.1f} GiB per GPU, fits = peak ≤ {USABLE:.0%} of it; "
             f"FSDP2 over {FSDP_WORLD} GPUs shards weights, gradients and optimizer state (the fold form's rotation "
             "state excepted: every rank rotates whole weights and keeps it whole), not activations.\n"]
    headers = ["shape (micro-batch)", "method", "weights GiB", "grads GiB", "opt state GiB", "step cache GiB",
               "act GiB", "act +ckpt GiB", "1 GPU peak", "+ckpt", f"FSDP{FSDP_WORLD} peak/GPU", "+ckpt",
               "fits 1 GPU (+ckpt)", f"fits FSDP{FSDP_WORLD} (+ckpt)"]
    body = []
    for shape in shapes():
        for method in METHODS:
            one, one_ac = (model_bytes(shape, method, True, 1, ac) for ac in (False, True))
            fsdp, fsdp_ac = (model_bytes(shape, method, True, FSDP_WORLD, ac) for ac in (False, True))
            body.append([f"{shape.name} ({shape.batch}×{shape.seq})", method.label, gib(one["weights"]), gib(one["grads"]),
                         gib(one["state"]), gib(one["cache"]), gib(one["activations"]), gib(one_ac["activations"]),
                         gib(one["peak"]), gib(one_ac["peak"]),
                         gib(fsdp["peak"]), gib(fsdp_ac["peak"]), f"{fits(one['peak'])} ({fits(one_ac['peak'])})",
                         f"{fits(fsdp['peak'])} ({fits(fsdp_ac['peak'])})"])
    lines.append(markdown_table(headers, body, align="ll" + "r" * 10 + "cc") + "\n")
    headers = ["shape", "tokens/step", "method", "model TFLOP/step", "+ckpt", "POET extra TFLOP", "extra %",
               "FSDP extra %"]
    body = []
    for shape in shapes():
        for method in METHODS:
            flops, extra = step_flops(shape, method, False)
            flops_ac, _ = step_flops(shape, method, True)
            _, extra_fsdp = step_flops(shape, method, False, FSDP_WORLD)
            body.append([shape.name, shape.batch * shape.seq * shape.accum, method.label, f"{flops / 1e12:.1f}",
                         f"{flops_ac / 1e12:.1f}", f"{extra / 1e12:.3f}", f"{100 * extra / flops:.2f}",
                         f"{100 * extra_fsdp / flops:.2f}"])  # the fold form: every rank rotates every weight
    lines.append(markdown_table(headers, body, align="lrlrrrrr"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Validation against step.py on CPU (fp32, its CPU micro-batches, one process).

STEP_METHODS = [method.key for method in METHODS]  # step.py's keys for the same configurations


def parse_step_output(text: str) -> dict:
    """{(preset, rows, seq, dtype, accum, label): (params+buffers, state, in-step, peak) MB} from step.py's memory tables."""
    measured, heading = {}, None
    for line in text.splitlines():
        match = re.match(r"#### (\S+): micro-batch (\d+)×(\d+) tokens, (\w+),", line)
        if match:
            heading = (match.group(1), int(match.group(2)), int(match.group(3)), match.group(4))
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if heading and len(cells) >= 7 and cells[0].isdigit() and cells[2].isdigit() and cells[3].isdigit():
            label = cells[1].replace(" (preset)", "")
            measured[(*heading, int(cells[0]), label)] = tuple(float(x) for x in cells[2:6])
    return measured


def validate(args) -> str:
    if args.measured:
        text = Path(args.measured).read_text()
    else:
        command = [sys.executable, str(Path(__file__).with_name("step.py")), "--presets", "tiny", "llama-60m", "--methods",
                   *STEP_METHODS, "--accum", "1", "4", "--repeats", "1", "--merges", "0", "--activation-checkpointing", "both"]
        print("$ " + " ".join(command[1:]), file=sys.stderr)
        text = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    measured = parse_step_output(text)
    headers = ["preset", "dtype", "accum", "method", "static MB model / measured", "in-step MB model / measured",
               "peak MB model / measured", "peak error"]
    body = []
    for (preset, rows, seq, dtype, accum, label), (model_mb, state_mb, step_mb, peak_mb) in measured.items():
        method = next((m for m in METHODS if m.label == label.removesuffix(" +ckpt")), None)
        if method is None or "+compile" in label:  # compiled code allocates what inductor decides
            continue
        shape = preset_shape(preset).with_micro_batch(rows, seq, accum)
        got = model_bytes(shape, method, False, 1, label.endswith(" +ckpt"), bf16=dtype == "bf16")
        error = got["peak"] / MIB / peak_mb - 1
        body.append([preset, dtype, accum, label, f"{got['static'] / MIB:.0f} / {model_mb + state_mb:.0f}",
                     f"{got['in_step'] / MIB:.0f} / {step_mb:.0f}", f"{got['peak'] / MIB:.0f} / {peak_mb:.0f}",
                     f"{100 * error:+.1f}%"])
    return markdown_table(headers, body, align="llrlrrrr")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--validate", action="store_true", help="compare the CPU model with step.py's measured bytes")
    parser.add_argument("--measured", help="with --validate: a saved step.py output instead of running it (~3 min)")
    args = parser.parse_args(argv)
    print(validate(args) if args.validate else gpu_tables())


if __name__ == "__main__":
    main()
