"""Writes docs/api/*.md, one page per public module of loki, and the API part of mkdocs.yml's nav.

Run from the repository root after adding, renaming or removing a module: `.venv/bin/python docs/api_pages.py`
(tests/test_docs.py checks that the pages and the modules agree).
"""

import re
from pathlib import Path


def public_modules(package: Path = Path("loki")) -> list[str]:
    """Dotted names of the package's modules with no part starting with `_`, the package itself first."""
    found = set()
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(p.startswith("_") for p in parts):
            found.add(".".join(parts))
    return sorted(found, key=lambda m: (m != package.name, m))


def main() -> None:
    api = Path("docs/api")
    api.mkdir(parents=True, exist_ok=True)
    for old in api.glob("*.md"):
        old.unlink()
    nav = []
    for module in public_modules():
        top = "." not in module
        page = "index.md" if top else module.split(".", 1)[1] + ".md"
        title = f"The top level: {module}" if top else module
        (api / page).write_text(f"# {title}\n\n::: {module}\n")
        nav.append(f"      - {module}: api/{page}")
    config = Path("mkdocs.yml")
    text = re.sub(
        r"  - API reference:.*\Z", "  - API reference:\n" + "\n".join(nav) + "\n", config.read_text(), flags=re.S
    )
    config.write_text(text)
    print(f"{len(nav)} API pages")


if __name__ == "__main__":
    main()
