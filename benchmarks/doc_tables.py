"""Benchmark tables that live in the docs: each script writes its own table between marker
comments, with the command line and the machine above it, so a table cannot drift from the
script that made it.

    <!-- name:begin -->
    ...written by the script...
    <!-- name:end -->
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")  # what decides whether bf16 is fast on an x86 CPU


def cpu_model() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; the platform's processor name where it is missing."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or "unknown CPU", flags


def machine() -> str:
    """One line: CPU model and its bf16/AMX flags, cores and torch threads, torch version, date."""
    import torch

    name, flags = cpu_model()
    have = [f for f in CPU_FLAGS if f in flags]
    bf16 = ", ".join(have) if have else "no " + "/".join(CPU_FLAGS)
    n = torch.get_num_threads()
    return (f"{name} ({bf16}), {os.cpu_count()} cores, {n} torch thread{'s' if n != 1 else ''}; "
            f"torch {torch.__version__}, Python {platform.python_version()}; "
            f"{datetime.date.today().isoformat()}")


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command line this run stands for: `python SCRIPT ARGS` (argv: sys.argv[1:] by default)."""
    return " ".join(["python", script, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def block(command: str, markdown: str, note: str | None = None) -> str:
    """The text a section holds: command, machine, an optional note, then the table."""
    lines = [f"Command: `{command}`  ", f"Machine: {machine()}."]
    if note:
        lines.append(note)
    return "\n".join(lines) + "\n\n" + markdown.strip() + "\n"


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(doc_path: str | Path, name: str, markdown: str) -> None:
    """Replace the text between `<!-- {name}:begin -->` and `<!-- {name}:end -->` in doc_path
    (appended at the end when the markers are missing), atomically: a reader sees the old
    file or the new one, never half of it. Everything outside the markers stays as it was."""
    path = Path(doc_path)
    begin, end = markers(name)
    doc = path.read_text(encoding="utf-8") if path.exists() else ""
    body = f"{begin}\n{markdown.strip()}\n{end}"
    i, j = doc.find(begin), doc.find(end)
    if i >= 0 and j > i:
        doc = doc[:i] + body + doc[j + len(end):]
    elif i >= 0 or j >= 0:
        raise ValueError(f"{path}: the markers of section {name!r} are incomplete or out of order")
    else:
        doc = doc.rstrip("\n") + ("\n\n" if doc else "") + body + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(doc, encoding="utf-8")
    os.replace(tmp, path)


def add_doc_args(ap: argparse.ArgumentParser, default_doc: str) -> None:
    """--doc PATH (default: the doc page the tables belong to), --no-doc, --markdown PATH."""
    ap.add_argument("--doc", default=str(REPO / default_doc),
                    help=f"refresh this page's tables between their markers (default {default_doc})")
    ap.add_argument("--no-doc", action="store_true", help="leave the docs alone (print the tables only)")
    ap.add_argument("--markdown", default=None,
                    help="write the tables to this file instead of the docs")


def publish(args: argparse.Namespace, sections: dict[str, str]) -> None:
    """Print each section; then write them to --markdown, or into --doc unless --no-doc."""
    text = "\n\n".join(f"{markers(n)[0]}\n{s.strip()}\n{markers(n)[1]}" for n, s in sections.items())
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    elif not args.no_doc:
        for name, body in sections.items():
            write_section(args.doc, name, body)
        print(f"wrote {', '.join(sections)} into {args.doc}")
