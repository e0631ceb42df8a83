"""benchmarks/doc_tables.py: a benchmark's table replaces only its own section of a doc page."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import doc_tables  # noqa: E402


def test_write_section_replaces_only_between_its_markers(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("# Page\n\nintro\n<!-- a:begin -->\nold a\n<!-- a:end -->\nmiddle\n"
                   "<!-- hf_memory:begin -->\nsomeone else's\n<!-- hf_memory:end -->\ntail\n")
    doc_tables.write_section(doc, "a", "| new | a |\n")
    assert doc.read_text() == ("# Page\n\nintro\n<!-- a:begin -->\n| new | a |\n<!-- a:end -->\nmiddle\n"
                               "<!-- hf_memory:begin -->\nsomeone else's\n<!-- hf_memory:end -->\ntail\n")
    doc_tables.write_section(doc, "b", "b's table")  # a section the page lacks is appended
    assert doc.read_text().endswith("tail\n\n<!-- b:begin -->\nb's table\n<!-- b:end -->\n")
    assert [p.name for p in tmp_path.iterdir()] == ["page.md"]  # no temporary file left


def test_write_section_refuses_a_broken_pair_and_leaves_the_page(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("<!-- a:end -->\n<!-- a:begin -->\n")
    with pytest.raises(ValueError, match="out of order"):
        doc_tables.write_section(doc, "a", "x")
    assert doc.read_text() == "<!-- a:end -->\n<!-- a:begin -->\n"


def test_machine_line_and_block(monkeypatch):
    monkeypatch.setattr(doc_tables, "cpu_model", lambda: ("Test CPU", {"avx512f", "amx_tile"}))
    line = doc_tables.machine()
    assert line.startswith("Test CPU (amx_tile), ") and " torch thread" in line and "; torch " in line
    monkeypatch.setattr(doc_tables, "cpu_model", lambda: ("Old CPU", {"avx2"}))
    assert "(no avx512_bf16/amx_bf16/amx_tile)" in doc_tables.machine()
    text = doc_tables.block(doc_tables.command_line("benchmarks/x.py", ["--rounds", "2", "a b"]), "| t |")
    assert text.startswith("Command: `python benchmarks/x.py --rounds 2 'a b'`  \nMachine: Old CPU")
    assert text.endswith("\n\n| t |\n")


def test_publish_markdown_leaves_the_doc_alone(tmp_path):
    doc, md = tmp_path / "doc.md", tmp_path / "out.md"
    doc.write_text("<!-- s:begin -->\nkept\n<!-- s:end -->\n")
    import argparse

    ap = argparse.ArgumentParser()
    doc_tables.add_doc_args(ap, "docs/x.md")
    doc_tables.publish(ap.parse_args(["--doc", str(doc), "--markdown", str(md)]), {"s": "new"})
    assert doc.read_text() == "<!-- s:begin -->\nkept\n<!-- s:end -->\n"
    assert md.read_text() == "<!-- s:begin -->\nnew\n<!-- s:end -->\n"
    doc_tables.publish(ap.parse_args(["--doc", str(doc), "--no-doc"]), {"s": "new"})
    assert "kept" in doc.read_text()
    doc_tables.publish(ap.parse_args(["--doc", str(doc)]), {"s": "new"})
    assert doc.read_text() == "<!-- s:begin -->\nnew\n<!-- s:end -->\n"
