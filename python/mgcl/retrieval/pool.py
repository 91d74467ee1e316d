"""The question pool M_0 (SPEC.md section 2): medical label questions organised
domain -> anatomical site -> finding, generated from a taxonomy file.

The shipped taxonomy is ``data/taxonomy.yaml`` (15 imaging domains, 500
distinct findings; about 4,300 questions). ``load_pool(path)`` also reads:
- a taxonomy file of the same shape (yaml or json); with ``extends: builtin``
  it is merged over the shipped one (new domains, sites and findings added);
- a jsonl file of questions, one ``{"text", "domain", "site", "finding"}`` a line,
  or a json list of such objects (used as given; ``load_pool() + load_pool(path)``
  adds them to the shipped pool).
"""
from __future__ import annotations

import copy
import functools
import json
import os
from dataclasses import dataclass

DATA = os.path.join(os.path.dirname(__file__), "data")
BUILTIN = os.path.join(DATA, "taxonomy.yaml")


@dataclass(frozen=True)
class Question:
    text: str
    domain: str
    site: str
    finding: str


def _read(path: str):
    with open(path, encoding="utf-8") as fh:
        if path.endswith(".json"):
            return json.load(fh)
        import yaml  # noqa: PLC0415

        return yaml.safe_load(fh)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key in ("keywords",):
        out[key] = list(dict.fromkeys(out.get(key, []) + list(extra.get(key, []))))
    for name, dom in (extra.get("domains") or {}).items():
        if name not in out["domains"]:
            out["domains"][name] = copy.deepcopy(dom)
            continue
        cur = out["domains"][name]
        for k in ("aliases", "templates"):
            cur[k] = list(dict.fromkeys(cur.get(k, []) + list(dom.get(k, []))))
        if dom.get("description"):
            cur["description"] = dom["description"]
        for site, findings in (dom.get("sites") or {}).items():
            cur["sites"][site] = list(dict.fromkeys(cur["sites"].get(site, []) + list(findings)))
    return out


def _validate(tax, path: str) -> dict:
    if not isinstance(tax, dict) or not isinstance(tax.get("domains"), dict) or not tax["domains"]:
        raise ValueError(f"taxonomy {path!r}: expected a mapping with a non-empty 'domains' mapping")
    for name, dom in tax["domains"].items():
        where = f"taxonomy {path!r}, domain {name!r}"
        if not isinstance(dom, dict):
            raise ValueError(f"{where}: expected a mapping")
        temps = dom.get("templates")
        if not temps or not all(isinstance(t, str) and "{finding}" in t for t in temps):
            raise ValueError(f"{where}: 'templates' must be a non-empty list of strings containing '{{finding}}'")
        sites = dom.get("sites")
        if not isinstance(sites, dict) or not sites:
            raise ValueError(f"{where}: 'sites' must map site names to lists of findings")
        for site, findings in sites.items():
            if not isinstance(findings, list) or not findings or not all(isinstance(f, str) and f for f in findings):
                raise ValueError(f"{where}, site {site!r}: expected a non-empty list of finding strings")
    return tax


@functools.lru_cache(maxsize=8)
def _load_taxonomy(path: str) -> dict:
    tax = _read(path)
    if isinstance(tax, dict) and tax.get("extends") == "builtin" and os.path.abspath(path) != BUILTIN:
        tax = _merge(_load_taxonomy(BUILTIN), tax)
    return _validate(tax, path)


def load_taxonomy(path: str | None = None) -> dict:
    """The taxonomy mapping (a deep copy: callers may edit it)."""
    return copy.deepcopy(_load_taxonomy(os.path.abspath(path or BUILTIN)))


def questions_from_taxonomy(tax: dict) -> list[Question]:
    out, seen = [], set()
    for domain, dom in tax["domains"].items():
        for site, findings in dom["sites"].items():
            for finding in findings:
                for t in dom["templates"]:
                    text = t.format(site=site, finding=finding)
                    if text not in seen:
                        seen.add(text)
                        out.append(Question(text, domain, site, finding))
    return out


def _question(d, where: str) -> Question:
    try:
        q = Question(str(d["text"]), str(d["domain"]), str(d.get("site", "")), str(d.get("finding", "")))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{where}: expected a JSON object with text and domain ({exc!r})") from None
    if not q.text.strip() or not q.domain.strip():
        raise ValueError(f"{where}: empty text or domain")
    return q


def load_pool(path: str | None = None) -> list[Question]:
    """The question pool: the shipped one, or the one in ``path`` (module doc)."""
    if path is not None and not os.path.exists(path):
        raise FileNotFoundError(f"question pool file {path!r} does not exist")
    path = os.fspath(path) if path is not None else None
    if path is not None and path.endswith(".jsonl"):
        out = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
                out.append(_question(d, f"{path}:{n}"))
        if not out:
            raise ValueError(f"{path}: no questions")
        return out
    if path is not None and path.endswith(".json"):
        items = _read(path)
        if isinstance(items, list):  # a JSON list of questions
            if not items:
                raise ValueError(f"{path}: no questions")
            return [_question(d, f"{path}[{i}]") for i, d in enumerate(items)]
    return questions_from_taxonomy(_load_taxonomy(os.path.abspath(path or BUILTIN)))


def domains(pool: list[Question]) -> list[str]:
    """The pool's domains in first-seen order."""
    return list(dict.fromkeys(q.domain for q in pool))


def keywords(path: str | None = None) -> list[str]:
    """The ~30 domain keywords of the uniform reference set."""
    return list(load_taxonomy(path).get("keywords", []))


def domain_descriptions(path: str | None = None) -> dict[str, str]:
    return {d: v.get("description", d) for d, v in load_taxonomy(path)["domains"].items()}


def resolve_domain(name: str, known: list[str], path: str | None = None) -> str | None:
    """``name`` as one of ``known`` domains (exact, case-insensitive, or a taxonomy alias), else None."""
    if not isinstance(name, str) or not name.strip():
        return None
    low = name.strip().lower()
    for d in known:
        if d.lower() == low:
            return d
    tax = load_taxonomy(path)["domains"]
    for d in known:
        if low in (a.lower() for a in tax.get(d, {}).get("aliases", [])):
            return d
    return None


__all__ = ["Question", "load_pool", "load_taxonomy", "questions_from_taxonomy", "domains", "keywords",
           "domain_descriptions", "resolve_domain", "BUILTIN"]
