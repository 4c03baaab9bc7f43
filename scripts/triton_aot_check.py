"""Compile the Triton relation-KL kernels ahead of time for sm_90 (H100), on a machine without a GPU.

Uses Triton's bundled ptxas/cuobjdump: catches compile errors the interpreter cannot, and prints
shared memory, registers, spilled stack bytes and the dot instruction (wgmma / mma / FMA) per
(kernel, dtype, tile, head slice), with the warps the toolkit's launcher picks. Nothing is
launched. Usage: ``python scripts/triton_aot_check.py`` (about a minute; needs ``triton``).
"""
import os, re, sys, subprocess, tempfile, itertools, json
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from toolkit.losses.relation_kl import triton as rk

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")

def sig_for(kernel, io_t, io_s, acc):
    a = "fp64" if acc == tl.float64 else "fp32"
    names = kernel.arg_names
    sig = {}
    for n in names:
        if n in ("TQ", "TK"): sig[n] = "*" + io_t
        elif n in ("SQ", "SK", "DQ", "DK"): sig[n] = "*" + io_s
        elif n == "MASK": sig[n] = "*i32"
        elif n in ("ROW_KL", "LSE_T", "LSE_S", "COEF"): sig[n] = "*" + a
        elif n in ("scale_t", "scale_s"): sig[n] = "fp32"
        elif n == "SCALES": sig[n] = "*" + a
        elif n in ("ACC", "PREC_T", "PREC_S", "BLOCK_M", "BLOCK_N", "BLOCK_DT", "BLOCK_DS"): sig[n] = "constexpr"
        elif n in ("t_sh", "s_sh"): sig[n] = "constexpr"   # contiguous: stride 1 is specialized
        else: sig[n] = "i32"
    return sig

# ints the JIT marks divisible by 16 at a BERT-base->MiniLM launch (L=128/512, dt=64, ds=32,
# Ht=768, Hs=384, strides multiples of 16); R=12 is not. Set DIV16_INTS = () to model ERNIE-tiny-like d=26.
DIV16_INTS = ("L", "dt", "ds", "t_sb", "t_sl", "s_sb", "s_sl", "m_sb")

def int_attrs(kernel, sig, div16=None):
    div16 = DIV16_INTS if div16 is None else div16
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
            if sig[n].startswith("*") or (sig[n] == "i32" and n in div16)}

def compile_one(kernel, io_t, io_s, bm, bn, bdt, bds, num_warps=None, num_stages=3):
    if num_warps is None:   # as the toolkit's launcher picks them now
        num_warps = 8 if (io_s in ("fp32", "fp64") or max(bm, bn) >= 128) else 4
    acc = tl.float64 if io_s == "fp64" else tl.float32
    prec = lambda io: "ieee" if io in ("fp32", "fp64") else "tf32"
    sig = sig_for(kernel, io_t, io_s, acc)
    consts = dict(ACC=acc, PREC_T=prec(io_t), PREC_S=prec(io_s), BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_DT=bdt, BLOCK_DS=bds, t_sh=1, s_sh=1)
    # pointers 16-byte aligned, as torch allocations are
    attrs = int_attrs(kernel, sig)
    src = ASTSource(kernel, sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.cubin"); open(p, "wb").write(k.asm["cubin"])
        out = subprocess.run([CUOBJDUMP, "-res-usage", p], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out); spill = re.search(r"STACK:(\d+)", out)
    ttgir = k.asm["ttgir"]
    mma = "wgmma(v3)" if "versionMajor = 3" in ttgir else ("mma(v2)" if "versionMajor = 2" in ttgir else "FMA")
    return dict(shared=k.metadata.shared, regs=int(regs.group(1)) if regs else None,
                stack_bytes=int(spill.group(1)) if spill else None, dot=mma,
                async_copies=ttgir.count('async_copy_global_to_local'))

if __name__ == "__main__":
    cases = []
    for kname in ("_relation_kl_fwd", "_relation_kl_bwd_dq", "_relation_kl_bwd_dk"):
        kern = getattr(rk, kname)
        for io, (bm, bn), bd in itertools.product(["bf16", "fp16", "fp32", "fp64"],
                                                  [(16, 16), (64, 64), (128, 128)], [16, 64]):
            if io == "fp64" and max(bm, bn) > 64:
                continue
            key = f"{kname:22s} io={io:5s} BM={bm:3d} BN={bn:3d} BD={bd:2d}"
            try:
                r = compile_one(kern, io, io, bm, bn, bd, bd)
                print(key, json.dumps(r), flush=True)
            except Exception as e:
                msg = str(e).strip().splitlines()
                print(key, "COMPILE ERROR:", type(e).__name__, (msg[-1] if msg else "")[:300], flush=True)
