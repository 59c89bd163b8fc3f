"""The ``rules`` annotator: chains of thought from attribute and lexical matching, no model.

For each example it finds, per dimension, the words of the query and of the item text that the
dimension rests on (always exact substrings, as :func:`ellm_mkd.cot.parse` demands), decides a
verdict, and concludes with the *human* label's level name. Where the data knows the true verdicts
(the synthetic catalog's ``dim_*`` columns) they are used and only the evidence is looked up, so on
the catalog the chains render the ground truth.

Lexical rules (data without verdicts):

brand       the item's brand field; query evidence is the query's spelling of it (exact, or a
            query word within edit distance 2 of a brand word of 4+ letters: misspellings). A
            query naming another known brand (any brand of the dataset) is a mismatch; else absent.
model       query words mixing letters and digits that are not measurements ("vx-2041", not "20v");
            compared with the item's model (``model:`` attribute, else such words of the title)
            ignoring case, hyphens and spaces: equal = match, one a prefix of the other or the same
            letters with other digits = partial, else mismatch; no model word in the query = absent.
attributes  query measurements ("12 in", "20v") and colour / material words; each found in the
            item text or not: all = match, some = partial, none = mismatch; none asked = absent.
category    the query's remaining content words (plural ``s`` ignored) against the title: all =
            match, some = partial, none = mismatch; no remaining words = absent.
usage       follows category (match/partial/mismatch/absent): titles alone do not say what a
            product is used with, so the rules do not guess complements.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ellm_mkd.schema import DIMENSIONS, VERDICTS

from .cot import ChainOfThought, Judgement

_WORD = re.compile(r"[^\W_]+(?:[-./][^\W_]+)*", re.UNICODE)
_UNITS = r"in|inch|ft|v|w|k|oz|gal|mm|cm|m|lb|lbs|pc|pcs|pk|pack|count|ct|qt|l|ml|amp|a|btu|watt|volt|piece"
_MEASURE = re.compile(r"^\d+(?:[./]\d+)*-?(?:" + _UNITS + r")?$", re.IGNORECASE)
_MEASURE_PAIR = re.compile(
    r"\b\d+(?:[./]\d+)*[\s-]?(?:in\.?|inch|ft\.?|v|w|k|oz|gal|mm|cm|lb|lbs|pc|pcs|pk|pack|count|ct|qt|ml|amp|btu|piece)\b",
    re.IGNORECASE,
)
COLOURS = frozenset(
    """black white red blue green yellow orange purple pink brown gray grey silver gold beige ivory
navy teal bronze copper chrome nickel brass tan cream charcoal white""".split()
)
MATERIALS = frozenset(
    """ceramic steel stainless aluminum aluminium wood wooden oak pine plastic glass metal iron brass
copper vinyl rubber leather cotton polyester nylon concrete stone marble granite bamboo fiberglass""".split()
)
STOPWORDS = frozenset("""a an and the for with of to in on by at or from best new cheap buy set pack kit""".split())


def _norm(s: str) -> str:
    return re.sub(r"[\s\-./]", "", s.casefold())


def _stem(w: str) -> str:
    w = w.casefold()
    return w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w


def _edit_distance(a: str, b: str, cap: int = 3) -> int:
    if abs(len(a) - len(b)) >= cap:
        return cap
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return min(prev[-1], cap)


def _find(needle: str, haystack: str) -> str | None:
    """``needle`` as it is spelled in ``haystack`` (case-insensitive, whole words), or None."""
    if not needle:
        return None
    m = re.search(r"(?<![^\W_])" + re.escape(needle) + r"(?![^\W_])", haystack, re.IGNORECASE)
    return m.group(0) if m else None


def _is_model_word(w: str) -> bool:
    return len(w) >= 4 and bool(re.search(r"\d", w)) and bool(re.search(r"[^\W\d_]", w)) and not _MEASURE.match(w)


class RuleAnnotator:
    """Chains of thought from lexical matching (and the data's true verdicts where known).

    Args:
        level_names: the label scheme's level names (the chain ends with the human label's name).
        brands: every brand name of the dataset (lets a query naming another brand be a mismatch).
    """

    def __init__(self, level_names: Iterable[str], brands: Iterable[str] = ()):
        self.level_names = tuple(level_names)
        self.brand_words = {b.casefold(): b for b in brands if b}

    # -- evidence -------------------------------------------------------------------------------
    def _brand(self, query: str, item: str, brand: str) -> tuple[str | None, str | None, str]:
        item_ev = _find(brand, item) if brand else None
        q_ev = _find(brand, query) if brand else None
        if q_ev is None and brand:
            for w in _WORD.findall(query):
                if len(w) >= 4 and any(
                    _edit_distance(w.casefold(), bw.casefold()) <= 2 for bw in brand.split() if len(bw) >= 4
                ):
                    q_ev = w
                    break
        if q_ev is not None:
            return q_ev, item_ev, "match"
        for bw, orig in self.brand_words.items():
            if bw != brand.casefold():
                other = _find(orig, query)
                if other:
                    return other, item_ev, "mismatch"
        return None, item_ev, "absent"

    def _model(self, query: str, item: str, attributes: str) -> tuple[str | None, str | None, str]:
        q_words = [w for w in _WORD.findall(query) if _is_model_word(w)]
        m = re.search(r"model:\s*([^;|]+)", attributes or "", re.IGNORECASE)
        item_models = [m.group(1).strip()] if m else [w for w in _WORD.findall(item) if _is_model_word(w)]
        item_models = [x for x in item_models if _find(x, item)]
        if not q_words:
            return None, (_find(item_models[0], item) if item_models else None), "absent"
        q = q_words[0]
        best = "mismatch"
        best_item = item_models[0] if item_models else None
        for im in item_models:
            a, b = _norm(q), _norm(im)
            if a == b:
                best, best_item = "match", im
                break
            if a.startswith(b) or b.startswith(a) or re.sub(r"\d", "", a) == re.sub(r"\d", "", b):
                best, best_item = "partial", im
        return q, (_find(best_item, item) if best_item else None), best

    def _attributes(self, query: str, item: str) -> tuple[str | None, str | None, str, set[str]]:
        asked = [m.group(0) for m in _MEASURE_PAIR.finditer(query)]
        asked += [w for w in _WORD.findall(query) if w.casefold() in COLOURS | MATERIALS]
        used = {t.casefold() for a in asked for t in _WORD.findall(a)}
        if not asked:
            return None, None, "absent", used
        found = [(a, _find(a, item)) for a in asked]
        hits = [(a, f) for a, f in found if f]
        verdict = "match" if len(hits) == len(asked) else ("partial" if hits else "mismatch")
        q_ev, i_ev = hits[0] if hits else (asked[0], None)
        return q_ev, i_ev, verdict, used

    def _category(self, query: str, title: str, item: str, skip: set[str]) -> tuple[str | None, str | None, str]:
        words = [
            w
            for w in _WORD.findall(query)
            if w.casefold() not in skip
            and w.casefold() not in STOPWORDS
            and not _is_model_word(w)
            and not _MEASURE.match(w)
        ]
        if not words:
            return None, None, "absent"
        title_stems = {_stem(w): w for w in _WORD.findall(title)}
        hits = [(w, title_stems[_stem(w)]) for w in words if _stem(w) in title_stems]
        verdict = "match" if len(hits) == len(words) else ("partial" if hits else "mismatch")
        q_ev = hits[0][0] if hits else words[-1]
        i_ev = _find(hits[0][1], item) if hits else None
        return q_ev, i_ev, verdict

    # -- one example --------------------------------------------------------------------------
    def annotate(self, row: Mapping[str, Any], item_text: str) -> ChainOfThought:
        """The chain of one example (a row of the example schema) whose item renders to ``item_text``."""
        query = row["query"]
        title = row.get("title") or ""
        bq, bi, bv = self._brand(query, item_text, row.get("brand") or "")
        mq, mi, mv = self._model(query, item_text, row.get("attributes") or "")
        aq, ai, av, attr_words = self._attributes(query, item_text)
        skip = set(attr_words)
        for ev in (bq, mq):
            if ev:
                skip |= {t.casefold() for t in _WORD.findall(ev)}
        skip |= {t.casefold() for t in _WORD.findall(row.get("brand") or "")}
        cq, ci, cv = self._category(query, title, item_text, skip)
        uq, ui, uv = cq, ci, cv
        found = {
            "category": (cq, ci, cv),
            "brand": (bq, bi, bv),
            "model": (mq, mi, mv),
            "attributes": (aq, ai, av),
            "usage": (uq, ui, uv),
        }
        judgements = []
        for d in DIMENSIONS:
            q_ev, i_ev, verdict = found[d]
            truth = row.get(f"dim_{d}")
            if truth in VERDICTS:
                verdict = truth
                if truth == "absent":
                    q_ev = None
            judgements.append(Judgement(d, q_ev, i_ev, verdict))
        label = row.get("label")
        if label is None:
            raise ValueError(f"example {row.get('example_id')}: the rules annotator needs a human label")
        return ChainOfThought(tuple(judgements), self.level_names[label])
