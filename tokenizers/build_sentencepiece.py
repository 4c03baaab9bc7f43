#!/usr/bin/env python3
"""Train a SentencePiece model (unigram or BPE) from text files.

Writes ``OUT_DIR/<prefix>.model`` and ``<prefix>.vocab``. Ids 0-3 are ``[PAD] [UNK] [CLS] [SEP]``
and ``[MASK]`` is a user-defined symbol, so the model plugs into BERT-style inputs. Chinese
needs a ``--character-coverage`` near 0.9995; use 1.0 for small alphabets.

Example:
    python tokenizers/build_sentencepiece.py --input corpus.txt --out-dir tokenizers/my-spm \
        --model-type unigram --vocab-size 32000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a SentencePiece unigram/BPE model from plain-text files.")
    p.add_argument("--input", nargs="+", required=True, help="UTF-8 text files, one sentence per line")
    p.add_argument("--out-dir", required=True, help="folder for <prefix>.model and <prefix>.vocab")
    p.add_argument("--prefix", default="spm", help="model file name prefix (default spm)")
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram", help="default unigram")
    p.add_argument("--vocab-size", type=int, default=32000, help="target vocabulary size (default 32000)")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="share of characters covered (0.9995 for Chinese, 1.0 for small alphabets)")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="sample at most this many sentences (0 = all)")
    p.add_argument("--max-sentence-length", type=int, default=4192, help="longer lines are skipped (bytes)")
    p.add_argument("--no-hard-vocab-limit", action="store_true",
                   help="allow a smaller vocabulary than --vocab-size when the corpus is small")
    p.add_argument("--threads", type=int, default=1, help="trainer threads (default 1)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    missing = [f for f in args.input if not Path(f).is_file()]
    if missing:
        print(f"error: input file not found: {missing[0]}", file=sys.stderr)
        return 2
    import sentencepiece as spm

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(args.input), model_prefix=str(out / args.prefix), model_type=args.model_type,
            vocab_size=args.vocab_size, character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size, shuffle_input_sentence=args.input_sentence_size > 0,
            max_sentence_length=args.max_sentence_length, hard_vocab_limit=not args.no_hard_vocab_limit,
            num_threads=args.threads, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]", eos_piece="[SEP]",
            user_defined_symbols=["[MASK]"], minloglevel=2,
        )
    except RuntimeError as e:  # e.g. vocab size too large for the corpus
        print(f"error: sentencepiece training failed: {e}", file=sys.stderr)
        return 2
    sp = spm.SentencePieceProcessor(model_file=str(out / f"{args.prefix}.model"))
    print(f"wrote {sp.get_piece_size()} pieces to {out / (args.prefix + '.model')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
