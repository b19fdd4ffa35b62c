"""The docs a clone can follow: every relative link in every *.md resolves inside the
repository, user docs cite no tracker issues, README's option lists match `--help`, and
the results README's kernel figures are the ones its plot draws."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

import pytest

from mnemosyne.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# Flags of other tools that README's commands use (pip, pytest, torchrun, the worker module).
OTHER_TOOLS = {
    "--no-deps",
    "--dist",
    "--nnodes",
    "--nproc-per-node",
    "--node-rank",
    "--master-addr",
    "--master-port",
    "--driver",
}


def markdown_files() -> list[Path]:
    try:
        out = subprocess.run(
            ["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        files = [ROOT / line for line in out.stdout.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist)
        files = [p for p in ROOT.rglob("*.md") if ".git" not in p.parts]
    assert files
    return files


def relative_links(md: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", md.read_text(encoding="utf-8"), flags=re.S)  # not in code blocks
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", t)]


@pytest.mark.parametrize("md", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(md: Path) -> None:
    for target in relative_links(md):
        path = (md.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{md.name}: {target} points outside the repository"
        assert path.exists(), f"{md.name}: {target} does not exist"


def test_user_docs_cite_no_tracker_issues() -> None:
    for md in markdown_files():
        assert not re.search(r"\bissues? #?\d+", md.read_text(encoding="utf-8"), re.I), md


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _parsers(sub)
    return out


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")}


def test_readme_option_lists_match_help() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", readme)) - OTHER_TOOLS
    known = set().union(*(_flags(p) for p in _parsers(build_parser())))
    assert mentioned - known == set(), "README mentions options no command has"
    cli_block = readme[readme.index("## CLI") :].split("```")[1]
    generate = next(p for p in _parsers(build_parser()) if p.prog == "mnemosyne generate")
    vllm_aliases = {"--tensor-parallel-size", "--pipeline-parallel-size", "--help"}  # -tp / -pp shown
    missing = _flags(generate) - vllm_aliases - set(re.findall(r"--[a-z][a-z0-9-]*", cli_block))
    assert missing == set(), "README's `generate` usage lacks options of `mnemosyne generate --help`"


def test_results_tables_agree_with_the_long_context_plot() -> None:
    from mnemosyne.bench.long_context.plot import read_kernel_log, with_decode_kernels

    results = ROOT / "benchmarks" / "results"
    res = json.loads((results / "long_context_h200_2026-11-21.json").read_text())
    plotted = with_decode_kernels(res, read_kernel_log(results / "lc_kernels_h200_2026-11-21_v2.log"))
    table = (results / "README.md").read_text(encoding="utf-8")
    for row in plotted["kernels"]["results"]:
        if row.get("kind") == "decode" and row["num_seqs"] == 1 and not row["shuffled_blocks"]:
            if row["ctx"] == 1 << 20:
                assert f"{row['tbps']:.2f} TB/s" in table, row
        if row.get("kind") == "prefill_chunk" and row["chunk"] == 4096 and row["path"] == "triton":
            assert f"{row['tflops']:.0f} TFLOP/s" in table, row
