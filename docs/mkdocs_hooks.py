"""MkDocs hooks: the knowledge base is built from the repository's own files, where they live.

MkDocs wants its pages in one docs folder; careflow keeps each document next to what it
describes (README.md, schemas/README.md, runbooks/*.md, ...). So the site's files are the
repository's Markdown files under their repository paths (links between them stay as they are
on GitHub), plus the non-Markdown files those pages link to, served as they are. A runbook page
is published at ``runbooks/NAME.md/`` so that ``CAREFLOW_RUNBOOK_URL`` + a rule's ``runbook:``
path (``runbooks/NAME.md``) opens the rendered page.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", ".git", "build", "dist", "site", "tests", "bench", "node_modules",
             "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
# linked from the pages: configuration, dashboards and rules readers open from the site
STATIC = ("*.conf", "*.acl", "*.json", "*.yaml", "*.yml", "*.service", "*.sh", "*.toml", "*.png",
          "*.svg")


def _repository_files() -> list[str]:
    """Repository paths of the pages and the files they may link to, sorted."""
    found = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in names:
            if name.endswith(".md") or any(fnmatch.fnmatch(name, p) for p in STATIC):
                found.append((Path(folder) / name).relative_to(ROOT).as_posix())
    return sorted(found)


def _expand(nav: Any, paths: list[str]) -> Any:  # noqa: ANN401 - MkDocs' nav is untyped YAML
    """Nav entries that are globs (``runbooks/*.md``) become one entry per file, so a new
    runbook is in the menu without editing mkdocs.yml."""
    if isinstance(nav, list):
        expanded: list[Any] = []
        for item in nav:
            if isinstance(item, str) and "*" in item:
                expanded.extend(sorted(p for p in paths if fnmatch.fnmatch(p, item)
                                       and not p.endswith("README.md")))
            else:
                expanded.append(_expand(item, paths))
        return expanded
    if isinstance(nav, dict):
        return {key: _expand(value, paths) for key, value in nav.items()}
    return nav


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Expand the nav's globs over the repository's files."""
    config.nav = _expand(config.nav, _repository_files())
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """The repository's pages and linked files replace the docs folder's (which holds this hook)."""
    del files
    site = Files([])
    for path in _repository_files():
        file = File.generated(config, path, abs_src_path=str(ROOT / path))
        if path.startswith("runbooks/") and path.endswith(".md") and path != "runbooks/README.md":
            file.dest_uri = f"{path}/index.html"
            file.url = f"{path}/"
        site.append(file)
    return site
