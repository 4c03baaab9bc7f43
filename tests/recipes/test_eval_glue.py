"""`toolkit eval --tasks glue`: the eleven GLUE server files, AX included, as one folder and one zip."""
from __future__ import annotations

import json
import shutil
import zipfile

import pytest
from click.testing import CliRunner

# The GLUE server's file names and each file's allowed prediction values.
GLUE_FILES = {
    "CoLA.tsv": ("CoLA/test.tsv", {"0", "1"}),
    "SST-2.tsv": ("SST-2/test.tsv", {"0", "1"}),
    "MRPC.tsv": ("MRPC/test.tsv", {"0", "1"}),
    "STS-B.tsv": ("STS-B/test.tsv", None),
    "QQP.tsv": ("QQP/test.tsv", {"0", "1"}),
    "MNLI-m.tsv": ("MNLI/test_matched.tsv", {"entailment", "neutral", "contradiction"}),
    "MNLI-mm.tsv": ("MNLI/test_mismatched.tsv", {"entailment", "neutral", "contradiction"}),
    "QNLI.tsv": ("QNLI/test.tsv", {"entailment", "not_entailment"}),
    "RTE.tsv": ("RTE/test.tsv", {"entailment", "not_entailment"}),
    "WNLI.tsv": ("WNLI/test.tsv", {"0", "1"}),
    "AX.tsv": ("diagnostic/diagnostic.tsv", {"entailment", "neutral", "contradiction"}),
}


def _test_ids(path):
    """The first column of an official test file (``index``, or QQP's ``id``), read directly."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    assert lines[0].split("\t")[0] in ("index", "id")
    return [line.split("\t")[0] for line in lines[1:] if line.strip()]


def _rows(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines[0], [tuple(line.split("\t")) for line in lines[1:]]


@pytest.fixture
def glue_data(assets_dir, tmp_path):
    """The GLUE fixtures, with AX holding MNLI test_matched's sentence pairs in the same order:
    the MNLI model must then predict the same labels for both files."""
    root = tmp_path / "glue"
    shutil.copytree(assets_dir / "glue", root)
    head, *rows = (root / "MNLI" / "test_matched.tsv").read_text(encoding="utf-8").splitlines()
    cols = head.split("\t")
    s1, s2 = cols.index("sentence1"), cols.index("sentence2")
    ax = ["index\tsentence1\tsentence2"] + [f"{i}\t{r.split(chr(9))[s1]}\t{r.split(chr(9))[s2]}"
                                             for i, r in enumerate(rows)]
    (root / "diagnostic" / "diagnostic.tsv").write_text("\n".join(ax) + "\n", encoding="utf-8")
    return root


def test_eval_glue_writes_the_complete_submission(tiny_bert_dir, glue_data, tmp_path):
    from toolkit.cli import main

    out = tmp_path / "ev"
    r = CliRunner().invoke(main, ["eval", "--model", str(tiny_bert_dir), "--tasks", "glue", "--data-dir",
                                  str(glue_data), "--output-dir", str(out), "max_steps=2", "max_seq_length=32"])
    assert r.exit_code == 0, r.output
    folder = out / "submissions" / "glue"
    assert sorted(p.name for p in folder.iterdir()) == sorted(GLUE_FILES)
    with zipfile.ZipFile(out / "submissions" / "glue.zip") as z:
        # Files at the zip's top level, no folder: what the GLUE server takes.
        assert sorted(z.namelist()) == sorted(GLUE_FILES)
        for name in GLUE_FILES:
            assert z.read(name) == (folder / name).read_bytes()
    for name, (source, allowed) in GLUE_FILES.items():
        header, rows = _rows(folder / name)
        assert header == "index\tprediction", name
        assert [row[0] for row in rows] == _test_ids(glue_data / source), name
        for row in rows:
            assert len(row) == 2
            if allowed is None:
                assert float(row[1]) == float(row[1])  # STS-B: a finite number
            else:
                assert row[1] in allowed, (name, row)
    # AX comes from the MNLI model: same sentence pairs, same predictions as MNLI-m.
    assert [v for _, v in _rows(folder / "AX.tsv")[1]] == [v for _, v in _rows(folder / "MNLI-m.tsv")[1]]
    res = json.loads((out / "results.json").read_text())
    assert "ax" not in res["tasks"]  # never fine-tuned itself
    mnli_subs = res["tasks"]["mnli"]["best"]["submissions"]
    assert mnli_subs["ax/test"]["task"] == "ax" and mnli_subs["ax/test"]["path"].endswith("AX.tsv")
    assert res["submissions"]["glue"]["missing"] == []
    assert res["submissions"]["glue"]["zip"] == str(out / "submissions" / "glue.zip")
    # The table was printed: one row per task, then the average.
    for task in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"):
        assert f"| {task} |" in r.output
    assert "| **average** |" in r.output
    assert (out / "results.md").read_text() in r.output


def test_incomplete_glue_submission_is_reported(tiny_bert_dir, glue_data, tmp_path, caplog):
    from toolkit.recipes.evaluate import EvalConfig, run_eval

    (glue_data / "diagnostic" / "diagnostic.tsv").unlink()
    out = tmp_path / "ev"
    res = run_eval(EvalConfig(model=str(tiny_bert_dir), tasks=["rte", "mnli"], data_dir=str(glue_data),
                              output_dir=str(out), max_steps=1, max_seq_length=32))
    assert res["submissions"]["glue"]["files"] == ["MNLI-m.tsv", "MNLI-mm.tsv", "RTE.tsv"]
    assert "AX.tsv" in res["submissions"]["glue"]["missing"] and "CoLA.tsv" in res["submissions"]["glue"]["missing"]
    with zipfile.ZipFile(out / "submissions" / "glue.zip") as z:
        assert sorted(z.namelist()) == ["MNLI-m.tsv", "MNLI-mm.tsv", "RTE.tsv"]


def test_ax_alone_is_refused(tiny_bert_dir, glue_data, tmp_path):
    from toolkit.errors import ConfigError
    from toolkit.recipes.evaluate import EvalConfig, run_eval

    with pytest.raises(ConfigError, match="'ax' has no training data.*add 'mnli'"):
        run_eval(EvalConfig(model=str(tiny_bert_dir), tasks=["ax"], data_dir=str(glue_data),
                            output_dir=str(tmp_path / "ev"), max_steps=1))
