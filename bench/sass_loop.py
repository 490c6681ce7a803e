"""What the weight-only tensor-core kernel's main loop executes, per thread, without a GPU:
``_dot_kernel`` compiled for sm_90 by Triton's own ptxas, disassembled by its nvdisasm, and
the instructions of the loop that issues the wgmmas counted by opcode.

    python -m bench.sass_loop [--rows 256 --block-n 128 --block-k 128 --warps 8 --stages 3]
                              [--tma] [--bits 4] [--module PATH --constexpr H2=1 --words]

A count is not a time, but it says where a kernel's issue slots go before a GPU is at hand
(bench/RESULTS.md: the 4-bit loop at 256 rows spends ~60% of them unpacking codes).
``--module`` compiles the ``_dot_kernel`` of another file with the same arguments (a scratch
variant; ``--constexpr`` sets its extra compile-time arguments, ``--words`` passes the codes
as int32 words). Every integer argument is taken as a multiple of 16, as Triton specializes
Llama-shaped calls at run time; without that the compiled loop is not the one that runs.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from twinfer_kernels import quant_matmul

_INSTRUCTION = re.compile(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def compile_dot_kernel(fn, *, rows: int, block_n: int, block_k: int, bits: int = 4,
                       group_size: int = 128, warps: int = 4, stages: int = 3,
                       tma: bool = False, words: bool = False,
                       extra: dict | None = None, arch: int = 90):
    """``fn`` (``_dot_kernel`` or a variant) compiled for CUDA ``arch`` with fp16 activations."""
    if not isinstance(fn, JITFunction):
        raise ValueError("the kernel is an interpreted function: unset TRITON_INTERPRET to "
                         "compile it for a GPU")
    code = "i32" if words else "u8"
    code_row = block_k * bits // (32 if words else 8)
    sig = dict(x_ptr="*fp16", qw_ptr=f"*{code}",
               qw_desc=f"tensordesc<{code}[{block_n}, {code_row}]>" if tma else f"*{code}",
               scales_ptr="*fp16", zeros_ptr="*fp16", bias_ptr="*fp16", out_ptr="*fp16")
    const = dict(BITS=bits, GROUP_SIZE=group_size, SCALE_AFTER_DOT=False, FP16_MATH=True,
                 HAS_BIAS=False, PRECISION="tf32", TMA=tma, BLOCK_M=rows, BLOCK_N=block_n,
                 BLOCK_K=block_k, GROUP_M=8, **(extra or {}))
    for name in fn.arg_names:
        sig.setdefault(name, "constexpr" if name in const else "i32")
    aligned = [i for i, name in enumerate(fn.arg_names)
               if sig[name] != "constexpr" and not sig[name].startswith("tensordesc")]
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def disassemble(cubin: bytes) -> str:
    """SASS text of ``cubin`` by the nvdisasm that ships with Triton."""
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout


def main_loop_opcodes(sass: str, marker: str = "HGMMA") -> collections.Counter:
    """Opcodes of the last backward branch's body that contains ``marker`` (the K loop)."""
    lines = sass.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if line.startswith(".L")}
    body = None
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L\w+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            candidate = lines[labels[m.group(1)]:i + 1]
            if any(marker in c for c in candidate):
                body = candidate
    if body is None:
        raise ValueError(f"no loop containing {marker} in the SASS")
    return collections.Counter(m.group(1) for m in map(_INSTRUCTION.search, body) if m)


def _load_variant(path: str):
    spec = importlib.util.spec_from_file_location("dot_variant", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the module look themselves up there
    spec.loader.exec_module(module)
    return module._dot_kernel


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="BLOCK_M")
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--block-k", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--tma", action="store_true", help="the codes by TMA (kernel dot_tma)")
    ap.add_argument("--module", help="compile _dot_kernel from this file instead")
    ap.add_argument("--constexpr", action="append", default=[], metavar="NAME=INT")
    ap.add_argument("--words", action="store_true", help="codes as int32 words (variants)")
    args = ap.parse_args(argv)
    fn = _load_variant(args.module) if args.module else quant_matmul._dot_kernel
    extra = {k: int(v) for k, v in (c.split("=", 1) for c in args.constexpr)}
    kernel = compile_dot_kernel(fn, rows=args.rows, block_n=args.block_n, block_k=args.block_k,
                                bits=args.bits, group_size=args.group_size, warps=args.warps,
                                stages=args.stages, tma=args.tma, words=args.words,
                                extra=extra)
    ops = main_loop_opcodes(disassemble(kernel.asm["cubin"]))
    total = sum(ops.values())
    codes = args.block_n * args.block_k / (32 * args.warps)
    print(f"K loop of {args.module or '_dot_kernel'} (BM {args.rows}, BN {args.block_n}, "
          f"BK {args.block_k}, {args.warps} warps, {args.stages} stages, "
          f"{'TMA' if args.tma else 'plain'} codes): {total} instructions per thread per "
          f"K tile, {total / codes:.1f} per weight code; shared memory "
          f"{kernel.metadata.shared} bytes")
    print("| opcode | count |\n|---|---:|")
    for op, n in ops.most_common():
        print(f"| {op} | {n} |")


if __name__ == "__main__":
    main()
