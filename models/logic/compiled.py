"""The discretised LogicNet as C: bitwise operations on uint64 words, 64 images per word.

`write_c_source` emits one self-contained C file (no headers beyond the C library) whose entry
point is

    void logic_net_predict(const uint8_t *images, int64_t n, int32_t *pred, int32_t *counts)

taking uint8 images [n][C][H][W] and writing each image's class (`pred`, [n]) and its class
counts (`counts`, [n][classes], may be NULL). Bit j of every word is image j of a block of 64:
thresholding packs the pixels, each tree-conv gate is one expression per position, OR pooling is
`|`, each logic-layer neuron one expression, and GroupSum counts bits per image through 64x64
bit transposes and popcounts. Compiled with `-DLOGIC_NET_MAIN` it is also a CLI that reads raw
images from stdin and prints one class per line.

Exactness: thresholds are turned into integer pixel cut-offs by the very float32 comparison
`LogicNet.binarize` makes, and the argmax keeps the first maximum, as torch.argmax does, so
predictions equal the PyTorch discretised network's bit for bit.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from scaleyard.models.logic.conv import LogicConv2d
from scaleyard.models.logic.network import LogicNet

# gate index -> C expression of words a and b (same order as gates.GATES)
C_GATES = ("0ULL", "(A & B)", "(A & ~B)", "A", "(~A & B)", "B", "(A ^ B)", "(A | B)", "~(A | B)", "~(A ^ B)",
           "~B", "(A | ~B)", "~A", "(~A | B)", "~(A & B)", "~0ULL")
CFLAGS = ("-O2", "-std=c99", "-shared", "-fPIC")
FC_CHUNK = 256  # logic-layer neurons per generated C function


class CompileError(RuntimeError):
    pass


def gate_expr(gate: int, a: str, b: str) -> str:
    return C_GATES[gate].replace("A", a).replace("B", b)


def pixel_cutoffs(net: LogicNet) -> list[int]:
    """For each threshold level, the smallest uint8 pixel p with float32(p / 255) > level (256 if
    none): the comparison `binarize` makes on decoded images, done once for all 256 values."""
    values = torch.arange(256, dtype=torch.float32).div_(255.0)
    cutoffs = []
    for level in net.levels.cpu():
        above = (values > level).nonzero()
        cutoffs.append(int(above[0]) if len(above) else 256)
    return cutoffs


def _runtime(classes: int) -> str:
    return f"""
static void transpose64(uint64_t a[64]) {{
    /* 64x64 bit matrix transpose by block swaps (32, 16, ..., 1): afterwards word s holds bit s
       of every input word, so popcount(word s) counts image s's ones */
    uint64_t m = 0x00000000FFFFFFFFULL;
    for (int j = 32; j; j >>= 1, m ^= m << j)
        for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {{
            uint64_t t = ((a[k] >> j) ^ a[k | j]) & m;
            a[k] ^= t << j;
            a[k | j] ^= t;
        }}
}}

static void count_group(const uint64_t *words, int len, int32_t cnt[64]) {{
    uint64_t block[64];
    for (int s = 0; s < 64; ++s) cnt[s] = 0;
    for (int start = 0; start < len; start += 64) {{
        int take = len - start < 64 ? len - start : 64;
        for (int i = 0; i < 64; ++i) block[i] = i < take ? words[start + i] : 0;
        transpose64(block);
        for (int s = 0; s < 64; ++s) cnt[s] += __builtin_popcountll(block[s]);
    }}
}}

#define CLASSES {classes}
"""


def write_c_source(net: LogicNet, out: Path) -> Path:
    """Write the C program of `net`'s discretised circuit to `out` (a .c file)."""
    cfg = net.cfg
    lines: list[str] = []
    emit = lines.append
    channels, side = cfg.in_channels * cfg.thresholds, cfg.image_size
    cutoffs = pixel_cutoffs(net)
    gates = net.gate_count()
    emit(f"/* scaleyard logic-gate network: {gates['learned_gates']} learned gates, "
         f"{gates['gates_per_image']} gates evaluated per image. Generated; do not edit. */")
    emit("#include <stdint.h>\n#include <string.h>\n#include <stdio.h>\n#include <stdlib.h>")
    emit(_runtime(cfg.num_classes))
    buffers = [f"in0[{channels * (side + 2) ** 2}]"]
    # each step its own function (a conv + pool, or FC_CHUNK neurons): gcc's optimiser is
    # superlinear in function size, and one function of 16k statements takes minutes to compile
    steps: list[list[str]] = []
    src, src_channels, src_side = "in0", channels, side
    convs = [m for m in net.convs if isinstance(m, LogicConv2d)]
    for layer, conv in enumerate(convs):
        pooled_side = src_side // 2
        buffers += [f"raw{layer}[{conv.channels * src_side * src_side}]",
                    f"pool{layer}[{conv.channels * (pooled_side + 2) ** 2}]"]
        steps.append(_conv_code(conv, layer, src, src_side) + _pool_code(layer, conv.channels, src_side))
        src, src_channels, src_side = f"pool{layer}", conv.channels, pooled_side
    # the first logic layer reads the flattened [channels, side, side] map, stored with a border
    padded = src_side + 2
    flat = torch.arange(src_channels * src_side * src_side)
    c, rest = flat // (src_side * src_side), flat % (src_side * src_side)
    where = (c * padded * padded + (rest // src_side + 1) * padded + rest % src_side + 1).tolist()
    for number, layer_module in enumerate(net.layers):
        dst = f"fc{number}"
        buffers.append(f"{dst}[{layer_module.out_dim}]")
        a, b, g = layer_module.idx_a.tolist(), layer_module.idx_b.tolist(), layer_module.gates().tolist()
        for first in range(0, layer_module.out_dim, FC_CHUNK):
            steps.append([f"    /* logic layer {number}: {layer_module.in_dim} -> {layer_module.out_dim}, "
                          f"neurons {first}.. */"] +
                         [f"    {dst}[{j}] = {gate_expr(g[j], f'{src}[{where[a[j]]}]', f'{src}[{where[b[j]]}]')};"
                          for j in range(first, min(first + FC_CHUNK, layer_module.out_dim))])
        src, where = dst, list(range(layer_module.out_dim))
    group = net.layers[-1].out_dim // cfg.num_classes
    emit(f"static const int CUTOFF[{len(cutoffs)}] = {{{', '.join(map(str, cutoffs))}}};")
    emit("\n".join(f"static uint64_t {b};" for b in buffers))
    for number, step in enumerate(steps):
        emit(f"static void step{number}(void) {{")
        lines.extend(step)
        emit("}")
    emit("static void block64(const uint8_t *images, int count, int32_t cnt[CLASSES][64]) {")
    emit(_pack_code(cfg.in_channels, cfg.thresholds, side))
    emit("    " + " ".join(f"step{number}();" for number in range(len(steps))))
    emit(f"    for (int k = 0; k < CLASSES; ++k) count_group({src} + k * {group}, {group}, cnt[k]);")
    emit("}")
    emit(_entry_code(cfg.in_channels * side * side))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def _pack_code(in_channels: int, thresholds: int, side: int) -> str:
    padded = side + 2
    return f"""    memset(in0, 0, sizeof in0);
    /* pixel by pixel, the 64 images' bits of each threshold gathered into one word, branch-free */
    for (int c = 0; c < {in_channels}; ++c)
        for (int y = 0; y < {side}; ++y)
            for (int x = 0; x < {side}; ++x) {{
                const uint8_t *pix = images + (c * {side} + y) * {side} + x;
                for (int t = 0; t < {thresholds}; ++t) {{
                    uint64_t word = 0;
                    for (int s = 0; s < count; ++s)
                        word |= (uint64_t)(pix[(int64_t)s * {in_channels * side * side}] >= CUTOFF[t]) << s;
                    in0[((c * {thresholds} + t) * {padded} + y + 1) * {padded} + x + 1] = word;
                }}
            }}"""


def _conv_code(conv: LogicConv2d, layer: int, src: str, side: int) -> list[str]:
    k, padded = conv.kernel, side + 2
    leaves, gates = conv.leaves.tolist(), conv.gates().tolist()
    code = [f"    /* tree conv {layer}: {conv.in_channels} -> {conv.channels}, depth {conv.depth} */",
            f"    for (int y = 0; y < {side}; ++y) for (int x = 0; x < {side}; ++x) {{",
            f"        const uint64_t *w = {src} + y * {padded} + x;",
            f"        uint64_t *o = raw{layer} + y * {side} + x;"]
    for kernel in range(conv.channels):
        names = []
        for cell in leaves[kernel]:
            c, rest = divmod(cell, k * k)
            names.append(f"w[{c * padded * padded + (rest // k) * padded + rest % k}]")
        node = 0
        while len(names) > 1:
            nxt = []
            for i in range(0, len(names), 2):
                nxt.append(f"n{kernel}_{node}")
                expr = gate_expr(gates[kernel][node], names[i], names[i + 1])
                code.append(f"        uint64_t {nxt[-1]} = {expr};")
                node += 1
            names = nxt
        code.append(f"        o[{kernel * side * side}] = {names[0]};")
    code.append("    }")
    return code


def _pool_code(layer: int, channels: int, side: int) -> list[str]:
    half, padded = side // 2, side // 2 + 2
    return [f"    memset(pool{layer}, 0, sizeof pool{layer});",
            f"    for (int c = 0; c < {channels}; ++c)",
            f"    for (int y = 0; y < {half}; ++y) for (int x = 0; x < {half}; ++x) {{",
            f"        const uint64_t *r = raw{layer} + (c * {side} + 2 * y) * {side} + 2 * x;",
            f"        pool{layer}[(c * {padded} + y + 1) * {padded} + x + 1] =",
            f"            r[0] | r[1] | r[{side}] | r[{side} + 1];",
            "    }"]


def _entry_code(image_size: int) -> str:
    return f"""
void logic_net_predict(const uint8_t *images, int64_t n, int32_t *pred, int32_t *counts) {{
    int32_t cnt[CLASSES][64];
    for (int64_t start = 0; start < n; start += 64) {{
        int count = n - start < 64 ? (int)(n - start) : 64;
        block64(images + start * {image_size}, count, cnt);
        for (int s = 0; s < count; ++s) {{
            int best = 0;  /* the first maximum, as torch.argmax */
            for (int k = 1; k < CLASSES; ++k) if (cnt[k][s] > cnt[best][s]) best = k;
            pred[start + s] = best;
            if (counts) for (int k = 0; k < CLASSES; ++k) counts[(start + s) * CLASSES + k] = cnt[k][s];
        }}
    }}
}}

#ifdef LOGIC_NET_MAIN
int main(void) {{  /* raw uint8 images ({image_size} bytes each) on stdin -> one class per line */
    static uint8_t buf[64 * {image_size}];
    int32_t pred[64];
    size_t got;
    while ((got = fread(buf, {image_size}, 64, stdin)) > 0) {{
        logic_net_predict(buf, (int64_t)got, pred, NULL);
        for (size_t i = 0; i < got; ++i) printf("%d\\n", pred[i]);
    }}
    return 0;
}}
#endif
"""


def find_compiler() -> str:
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    raise CompileError("no C compiler found (cc, gcc or clang on PATH); install gcc to compile logic networks")


def compile_shared_library(source: Path, out: Path | None = None, extra_flags: tuple[str, ...] = ()) -> Path:
    """`cc -O2 -shared -fPIC source -o source.so`; the compiler's own message on failure."""
    out = out or source.with_suffix(".so")
    cmd = [find_compiler(), *CFLAGS, *extra_flags, str(source), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise CompileError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return out


class CompiledLogicNet:
    """A compiled network loaded through ctypes; `predict` takes images as uint8 [N, C, H, W]
    or floats that are exact multiples of 1/255 (what the shard decoders give)."""

    def __init__(self, library: Path, net: LogicNet):
        self.library = Path(library)
        self.classes = net.cfg.num_classes
        self.shape = (net.cfg.in_channels, net.cfg.image_size, net.cfg.image_size)
        self._lib = ctypes.CDLL(str(self.library))
        self._fn = self._lib.logic_net_predict
        self._fn.restype = None
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]

    def to_uint8(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if tuple(array.shape[1:]) != self.shape:
            raise ValueError(f"images must be [N, {', '.join(map(str, self.shape))}], got {tuple(array.shape)}")
        if array.dtype != np.uint8:
            scaled = np.rint(array.astype(np.float64) * 255.0)
            if not np.array_equal((scaled.astype(np.float32) / np.float32(255.0)), array.astype(np.float32)):
                raise ValueError("images are not uint8 pixels / 255: the compiled network reads 8-bit images")
            array = scaled.astype(np.uint8)
        return np.ascontiguousarray(array)

    def predict(self, images: torch.Tensor | np.ndarray, with_counts: bool = False):
        pixels = self.to_uint8(images)
        n = len(pixels)
        pred = np.empty(n, dtype=np.int32)
        counts = np.empty((n, self.classes), dtype=np.int32) if with_counts else None
        self._fn(pixels.ctypes.data, n, pred.ctypes.data, counts.ctypes.data if counts is not None else None)
        return (pred, counts) if with_counts else pred


def compile_net(net: LogicNet, folder: Path, name: str = "logic_net") -> CompiledLogicNet:
    """Write, compile and load `net` in `folder` (C source and .so side by side)."""
    source = write_c_source(net, Path(folder) / f"{name}.c")
    return CompiledLogicNet(compile_shared_library(source), net)
