"""Fixtures shared by the corpus tests (kept in corpus_testlib with its helpers)."""
from corpus_testlib import tok  # noqa: F401  (fixture, found by pytest here)
