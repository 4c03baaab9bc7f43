#!/usr/bin/env python3
"""Train a BERT-style WordPiece vocabulary (vocab.txt + tokenizer_config.json) from text files.

Normalization is BERT's: clean control characters, lower-case and strip accents (unless
``--cased``), and put spaces around every CJK character so Chinese is split one character per
token, as Google's BERT and ERNIE vocabularies do. The result loads with
``transformers.AutoTokenizer.from_pretrained(OUT_DIR)`` (BertTokenizer).

Example:
    python tokenizers/build_wordpiece.py --input corpus.txt --out-dir tokenizers/my-wp --vocab-size 21128
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a BERT WordPiece vocab.txt from plain-text files (one text per line).")
    p.add_argument("--input", nargs="+", required=True, help="UTF-8 text files to learn from")
    p.add_argument("--out-dir", required=True, help="folder for vocab.txt and tokenizer_config.json")
    p.add_argument("--vocab-size", type=int, default=21128, help="target vocabulary size (default 21128)")
    p.add_argument("--min-frequency", type=int, default=2, help="drop merges seen fewer times (default 2)")
    p.add_argument("--limit-alphabet", type=int, default=20000,
                   help="keep at most this many distinct characters (Chinese needs many; default 20000)")
    p.add_argument("--unused", type=int, default=0,
                   help="reserve [unused1]..[unusedN] after [PAD], as Google's vocabularies do (default 0)")
    p.add_argument("--cased", action="store_true", help="keep case and accents (default: lower-case + strip accents)")
    p.add_argument("--model-max-length", type=int, default=512, help="written to tokenizer_config.json")
    return p.parse_args(argv)


def train(files: List[str], args: argparse.Namespace) -> List[str]:
    """Train and return the vocabulary in id order."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer

    specials = SPECIAL_TOKENS[:1] + [f"[unused{i}]" for i in range(1, args.unused + 1)] + SPECIAL_TOKENS[1:]
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None if not args.cased else False,
                                                lowercase=not args.cased)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = WordPieceTrainer(vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                               special_tokens=specials, limit_alphabet=args.limit_alphabet,
                               continuing_subword_prefix="##", show_progress=False)
    tok.train(files, trainer)
    vocab = tok.get_vocab()
    return [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    missing = [f for f in args.input if not Path(f).is_file()]
    if missing:
        print(f"error: input file not found: {missing[0]}", file=sys.stderr)
        return 2
    if args.vocab_size <= len(SPECIAL_TOKENS) + args.unused:
        print(f"error: --vocab-size {args.vocab_size} leaves no room beyond the special tokens", file=sys.stderr)
        return 2
    tokens = train(list(args.input), args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": not args.cased, "tokenize_chinese_chars": True,
              "strip_accents": None if not args.cased else False, "unk_token": "[UNK]", "sep_token": "[SEP]",
              "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]",
              "model_max_length": args.model_max_length}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(tokens)} tokens to {out / 'vocab.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
