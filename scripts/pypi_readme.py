"""Make the README fit to be the package description (PyPI's long_description).

    python scripts/pypi_readme.py README.md [--base-url URL] [--out FILE]

A package page has no repository beside it, so every relative target in the
README would be a dead link there. This rewrites, in the README text:
- relative links and images: onto ``--base-url`` (the repository's raw files at
  the release commit; the release workflow passes it), or without one into
  plain text that names the path (``docs/demo_curves.png``);
- the ``../shared/`` paths of the project's design notes, which lie outside
  the repository: into their bare names;
- the arXiv id of the paper: into a link to its abstract page.
``--check FILE`` exits 1 when FILE (a README or a wheel's METADATA) still has
a relative link or image. build_wheels.sh runs both on a copy of the tree.
"""
from __future__ import annotations

import argparse
import re
import sys

# [text](target) and ![alt](target); the target stops at whitespace or ')'.
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")
ABSOLUTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|#)", re.I)   # http:, https:, mailto:, an anchor
HTML_REF = re.compile(r"""<(?:img|a)\b[^>]*\b(?:src|href)\s*=\s*["'](?![a-z][a-z0-9+.-]*:|#)""", re.I)
SHARED = re.compile(r"\.\./shared/([\w.-]+)")
ARXIV = re.compile(r"(?<![\[/\w])arXiv (\d{4}\.\d{4,5})(?![\]\w])")


def rewrite(text: str, base_url: str | None = None) -> str:
    def link(m: re.Match) -> str:
        bang, label, target = m.groups()
        if ABSOLUTE.match(target):
            return m.group(0)
        path = target[2:] if target.startswith("./") else target
        if base_url:
            return f"{bang}[{label}]({base_url.rstrip('/')}/{path})"
        return f"*{label}* (`{path}` in the source)" if bang else f"{label} (`{path}` in the source)"

    text = LINK.sub(link, text)
    text = SHARED.sub(r"\1", text)
    return ARXIV.sub(r"[arXiv \1](https://arxiv.org/abs/\1)", text)


def relative_refs(text: str) -> list[str]:
    """The relative link / image targets left in ``text``."""
    bad = [m.group(3) for m in LINK.finditer(text) if not ABSOLUTE.match(m.group(3))]
    bad += [m.group(0) for m in HTML_REF.finditer(text)]
    return bad + [m.group(0) for m in SHARED.finditer(text)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("readme", help="the README to rewrite (or, with --check, the file to check)")
    p.add_argument("--base-url", help="where the repository's files are served, e.g. .../raw/<commit>")
    p.add_argument("--out", help="write here (default: rewrite README in place)")
    p.add_argument("--check", action="store_true", help="only report relative links and images; exit 1 if any")
    args = p.parse_args(argv)
    with open(args.readme, encoding="utf-8") as fh:
        text = fh.read()
    if args.check:
        bad = relative_refs(text)
        for b in bad:
            print(f"{args.readme}: relative reference {b!r}", file=sys.stderr)
        return 1 if bad else 0
    with open(args.out or args.readme, "w", encoding="utf-8") as fh:
        fh.write(rewrite(text, args.base_url))
    return 0


if __name__ == "__main__":
    sys.exit(main())
