#!/usr/bin/env python3
"""Trim a model's vocabulary to the pieces a corpus and task data use (and slice its embeddings).

A thin wrapper of ``toolkit.models.vocab_trim.trim_vocabulary`` (also ``toolkit trim-vocab``).
The trimmed folder tokenizes any text that the kept pieces cover exactly as before, and the
model computes the same outputs on it; ``vocab_trim.json`` lists the kept ids (new -> old).

Example:
    python tokenizers/trim_vocab.py --model runs/e5 --corpus 'data/zh/corpus/*.txt' \
        --tasks data/zh/tasks/zh_ner/zh_ner.yaml,tnews --data-dir clue --out runs/e5-zh
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

# The toolkit when it is not installed (an installed one comes first on sys.path).
sys.path.append(str(Path(__file__).resolve().parents[1]))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Trim a model's vocabulary to what a corpus and tasks use.")
    p.add_argument("--model", required=True, help="model folder with a fast tokenizer (SentencePiece or WordPiece)")
    p.add_argument("--corpus", nargs="*", default=[], help="corpus files, globs or hf: specs")
    p.add_argument("--tasks", default="", help="task names, groups or custom task YAMLs, comma-separated")
    p.add_argument("--data-dir", default=None, help="data root of registered tasks")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--min-count", type=int, default=1, help="drop pieces used fewer times (default 1)")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text (default text)")
    p.add_argument("--doc-separator", choices=("blank_line", "line"), default="blank_line",
                   help="text files: documents are blank-line blocks (default) or lines")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from toolkit.errors import ToolkitError
    from toolkit.models.vocab_trim import trim_vocabulary

    try:
        report = trim_vocabulary(args.model, args.out, corpus=args.corpus,
                                 tasks=[t for t in args.tasks.split(",") if t.strip()], data_dir=args.data_dir,
                                 min_count=args.min_count, text_field=args.text_field,
                                 doc_separator=args.doc_separator)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in asdict(report).items() if k != "kept_ids"}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
