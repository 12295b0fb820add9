"""
Referring expressions over a synthetic scene, as small programs.

A :class:`Program` (category / colour filter + optional selector) is *evaluated* on the
scene to the set of objects it denotes; an expression is only emitted for a target when
its program evaluates to exactly that target (or target set), which makes every
expression unambiguous by construction. Selectors only apply when they are clear:
extremes and ordinals need a ``position_margin`` gap, size comparisons a ``size_ratio``,
and a relation must hold strictly for the target while every other candidate fails
even its loose reading (e.g. "above" = centre higher at all).
"""

from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import numpy as np

from .config import SynthConfig
from .scene import Scene, SceneObject, pick
from .shapes import CATEGORIES, COLOURS, PLURALS

__all__ = [
    "Program",
    "Expression",
    "EXPRESSION_TYPES",
    "evaluate",
    "program_type",
    "describing_programs",
    "single_target_expressions",
    "multi_target_expressions",
    "no_target_expressions",
]

EXPRESSION_TYPES = (
    "category",
    "colour",
    "size",
    "position",
    "ordinal",
    "relation",
    "multi",
    "no_target",
)
_RELATIONS = ("left", "right", "above", "below")
_ORDINALS = {2: "second", 3: "third"}
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
_SIDES = {("x", "min"): "left", ("x", "max"): "right", ("y", "min"): "top", ("y", "max"): "bottom"}
# Tries at a not-yet-used phrasing before giving up on an extra variant.
_PHRASING_TRIES = 20

_NONE_T = ("the {n}", "{n}", "the {n} in the picture")
_SIZE_T = {
    ("max", False): ("the bigger {n}", "the larger {n}", "{n}, the bigger one"),
    ("max", True): ("the biggest {n}", "the largest {n}", "{n}, the biggest one"),
    ("min", False): ("the smaller {n}", "{n}, the smaller one", "the smaller of the two {np}"),
    ("min", True): ("the smallest {n}", "the tiniest {n}", "{n}, the smallest one"),
}
# (axis, end, more than two candidates) -> phrasings
_POS_T = {
    ("x", "min", False): ("the {n} on the left", "the left {n}", "{n} on the left"),
    ("x", "max", False): ("the {n} on the right", "the right {n}", "{n} on the right"),
    ("y", "min", False): ("the {n} at the top", "the upper {n}", "the top {n}"),
    ("y", "max", False): ("the {n} at the bottom", "the lower {n}", "the bottom {n}"),
    ("x", "min", True): (
        "the leftmost {n}",
        "the {n} furthest to the left",
        "the {n} farthest left",
    ),
    ("x", "max", True): (
        "the rightmost {n}",
        "the {n} furthest to the right",
        "the {n} farthest right",
    ),
    ("y", "min", True): ("the topmost {n}", "the highest {n}", "the {n} nearest the top"),
    ("y", "max", True): ("the lowest {n}", "the bottommost {n}", "the {n} nearest the bottom"),
}
_ORD_T = (
    "the {k} {n} from the {side}",
    "{k} {n} from the {side}",
    "the {n} that is {k} from the {side}",
)
_REL_WORDS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above", "higher than"),
    "below": ("below", "under", "beneath"),
}
_REL_T = ("the {n} {r} the {a}", "{n} {r} the {a}")
_ALL_T = ("all {np}", "all the {np}", "the {num} {np}")
_BOTH_T = ("both {np}",)


@dataclass(frozen=True)
class Program:
    """Objects matching ``category``/``colour`` (None = any), narrowed by ``selector``:
    ("size", "max"|"min"), ("pos", axis, end), ("ord", axis, end, k) or
    ("rel", relation, anchor_index, anchor_program). ``plural``: the whole group."""

    category: Optional[str] = None
    colour: Optional[str] = None
    selector: Optional[Tuple] = None
    plural: bool = False


@dataclass(frozen=True)
class Expression:
    text: str
    targets: Tuple[int, ...]  # indices into scene.objects; () = no target
    type: str
    program: Program
    # Relations: the words of ``text`` that name the landmark (anchor) object, e.g. "red circle".
    landmark_phrase: Optional[str] = None
    # The objects its category / colour words name: the candidates its selector chooses
    # from ("the second square from the left": every square), () for a no-target expression.
    group: Tuple[int, ...] = ()

    @property
    def landmark(self) -> Optional[int]:
        """Index into scene.objects of a relation's landmark (anchor) object, else None."""
        sel = self.program.selector
        return sel[2] if sel is not None and sel[0] == "rel" else None


def _members(objs: Sequence[SceneObject], category, colour) -> List[int]:
    return [
        i
        for i, o in enumerate(objs)
        if (category is None or o.category == category) and (colour is None or o.colour == colour)
    ]


def _coord(o: SceneObject, axis: str) -> float:
    return o.cx if axis == "x" else o.cy


def _ordered(objs, group, axis, end) -> List[int]:
    return sorted(group, key=lambda i: _coord(objs[i], axis), reverse=(end == "max"))


def _clear_order(objs, order: List[int], axis: str, upto: int, margin: float) -> bool:
    """The first ``upto + 1`` objects of ``order`` are pairwise separated by ``margin``."""
    c = [_coord(objs[i], axis) for i in order[: upto + 1]]
    return all(abs(a - b) >= margin for a, b in zip(c, c[1:]))


def _relation(rel: str, o: SceneObject, a: SceneObject, mx: float, my: float, strict: bool) -> bool:
    dx, dy = a.cx - o.cx, a.cy - o.cy  # > 0: o is left of / above a
    if rel in ("left", "right"):
        d = dx if rel == "left" else -dx
        return d >= mx and abs(dy) <= d if strict else d > 0
    d = dy if rel == "above" else -dy
    return d >= my and abs(dx) <= d if strict else d > 0


def evaluate(prog: Program, scene: Scene, cfg: SynthConfig) -> Optional[FrozenSet[int]]:
    """The objects ``prog`` denotes in ``scene``, or None when its selector is not clear."""
    objs = scene.objects
    group = _members(objs, prog.category, prog.colour)
    if prog.plural:
        return frozenset(group) if len(group) >= 2 else None
    sel = prog.selector
    if sel is None:
        return frozenset(group)
    if len(group) < 2:
        return None
    mx, my = cfg.position_margin * scene.width, cfg.position_margin * scene.height
    kind = sel[0]
    if kind == "size":
        order = sorted(group, key=lambda i: objs[i].area, reverse=(sel[1] == "max"))
        a0, a1 = objs[order[0]].area, objs[order[1]].area
        return frozenset(order[:1]) if max(a0, a1) >= cfg.size_ratio * min(a0, a1) else None
    if kind in ("pos", "ord"):
        axis, end = sel[1], sel[2]
        # "second from the left" needs a third candidate, else it just means "the right one".
        k = sel[3] if kind == "ord" else 1
        if kind == "ord" and len(group) < k + 1:
            return None
        order = _ordered(objs, group, axis, end)
        margin = mx if axis == "x" else my
        return frozenset([order[k - 1]]) if _clear_order(objs, order, axis, k, margin) else None
    if kind == "rel":
        rel, anchor = sel[1], sel[2]
        cands = [i for i in group if i != anchor]
        if len(cands) < 2:
            return None
        a = objs[anchor]
        strict = {i for i in cands if _relation(rel, objs[i], a, mx, my, True)}
        loose = {i for i in cands if _relation(rel, objs[i], a, mx, my, False)}
        return frozenset(strict) if len(strict) == 1 and loose == strict else None
    raise ValueError(f"Unknown selector {sel!r}")


def program_type(prog: Program) -> str:
    if prog.plural:
        return "multi"
    if prog.selector is None:
        return "colour" if prog.colour else "category"
    return {"size": "size", "pos": "position", "ord": "ordinal", "rel": "relation"}[
        prog.selector[0]
    ]


def _anchor_program(a: int, scene: Scene, cfg: SynthConfig) -> Optional[Program]:
    o = scene.objects[a]
    for cat, col in ((o.category, None), (o.category, o.colour), (None, o.colour)):
        p = Program(cat, col)
        if evaluate(p, scene, cfg) == {a}:
            return p
    return None


def _selectors(t: int, scene: Scene, cfg: SynthConfig):
    yield from (("size", end) for end in ("max", "min"))
    for axis in ("x", "y"):
        for end in ("min", "max"):
            yield ("pos", axis, end)
            for k in _ORDINALS:
                yield ("ord", axis, end, k)
    for a in range(len(scene.objects)):
        if a == t:
            continue
        ap = _anchor_program(a, scene, cfg)
        if ap is not None:
            for rel in _RELATIONS:
                yield ("rel", rel, a, ap)


def describing_programs(t: int, scene: Scene, cfg: SynthConfig) -> List[Program]:
    """Every program that denotes exactly object ``t``. Selectors are only added to
    descriptions that are ambiguous on their own (so the selector is needed)."""
    o = scene.objects[t]
    out = []
    selectors = list(_selectors(t, scene, cfg))
    for cat, col in ((None, None), (o.category, None), (None, o.colour), (o.category, o.colour)):
        group = evaluate(Program(cat, col), scene, cfg)
        if (cat or col) and group == {t}:
            out.append(Program(cat, col))
        if len(group) < 2:
            continue
        for sel in selectors:
            p = Program(cat, col, sel)
            if evaluate(p, scene, cfg) == {t}:
                out.append(p)
    return out


def _noun(prog: Program, rng, plural: bool = False) -> str:
    if prog.category:
        noun = PLURALS[prog.category] if plural else prog.category
    else:
        noun = pick(rng, ("shapes", "objects") if plural else ("shape", "object"))
    return f"{prog.colour} {noun}" if prog.colour else noun


def realize(prog: Program, scene: Scene, cfg: SynthConfig, rng) -> str:
    """One English phrasing of ``prog`` (random among the templates of its kind)."""
    return _realize(prog, scene, cfg, rng)[0]


def _realize(prog: Program, scene: Scene, cfg: SynthConfig, rng) -> Tuple[str, Optional[str]]:
    """:func:`realize` and, for a relation, the phrase naming its landmark (None otherwise).
    The phrase is kept as drawn: re-deriving it would draw again from ``rng``."""
    n = _noun(prog, rng)
    sel = prog.selector
    if prog.plural:
        size = len(_members(scene.objects, prog.category, prog.colour))
        templates = _ALL_T + (_BOTH_T if size == 2 else ())
        text = pick(rng, templates).format(
            np=_noun(prog, rng, plural=True), num=_NUMBERS.get(size, str(size))
        )
        return text, None
    if sel is None:
        return pick(rng, _NONE_T).format(n=n), None
    many = len(_members(scene.objects, prog.category, prog.colour)) > 2
    if sel[0] == "size":
        text = pick(rng, _SIZE_T[(sel[1], many)]).format(n=n, np=_noun(prog, rng, plural=True))
        return text, None
    if sel[0] == "pos":
        return pick(rng, _POS_T[(sel[1], sel[2], many)]).format(n=n), None
    if sel[0] == "ord":
        text = pick(rng, _ORD_T).format(n=n, k=_ORDINALS[sel[3]], side=_SIDES[(sel[1], sel[2])])
        return text, None
    _, rel, _, anchor_prog = sel
    # Same draw order as before the landmark phrase was kept: template, relation word, noun.
    template = pick(rng, _REL_T)
    words = pick(rng, _REL_WORDS[rel])
    landmark = _noun(anchor_prog, rng)
    return template.format(n=n, r=words, a=landmark), landmark


def _phrase_distinct(
    progs: List[Program], count: int, targets, scene, cfg, rng, kind: Optional[str] = None
) -> List[Expression]:
    """``count`` expressions of ``targets`` with distinct texts, cycling over ``progs``
    (rephrasing when they run out). ``kind``: their type (default: each program's)."""
    out: List[Expression] = []
    seen: Set[str] = set()
    for i in range(count * _PHRASING_TRIES):
        if len(out) == count:
            break
        prog = progs[i % len(progs)]
        text, landmark_phrase = _realize(prog, scene, cfg, rng)
        if text not in seen:
            seen.add(text)
            kind_of = kind or program_type(prog)
            group = tuple(_members(scene.objects, prog.category, prog.colour))
            out.append(Expression(text, tuple(targets), kind_of, prog, landmark_phrase, group))
    return out


def single_target_expressions(t: int, scene: Scene, cfg: SynthConfig, rng) -> List[Expression]:
    """2-3 expressions for object ``t`` using as many expression types as possible
    (weighted by ``cfg.type_weights``); [] when no program singles ``t`` out."""
    progs = describing_programs(t, scene, cfg)
    if not progs:
        return []
    by_type: Dict[str, List[Program]] = defaultdict(list)
    for p in progs:
        by_type[program_type(p)].append(p)
    count = int(rng.integers(cfg.expressions_per_target[0], cfg.expressions_per_target[1] + 1))
    weights = dict(cfg.type_weights)
    types = sorted(by_type)
    w = np.array([weights[k] for k in types], dtype=np.float64)
    chosen_types = rng.choice(len(types), size=min(count, len(types)), replace=False, p=w / w.sum())
    chosen = [pick(rng, by_type[types[i]]) for i in chosen_types]
    rest = [p for p in progs if p not in chosen]
    while len(chosen) < count and rest:
        chosen.append(rest.pop(int(rng.integers(len(rest)))))
    return _phrase_distinct(chosen, count, (t,), scene, cfg, rng)


def multi_target_expressions(scene: Scene, cfg: SynthConfig, rng) -> List[Expression]:
    """Up to ``cfg.multi_target_refs`` groups of >= 2 objects ("all red shapes", "both
    stars"), each with ``cfg.generalized_sentences`` phrasings."""
    groups: Dict[FrozenSet[int], Program] = {}
    for o in scene.objects:
        for cat, col in ((o.category, None), (None, o.colour), (o.category, o.colour)):
            p = Program(cat, col, plural=True)
            members = evaluate(p, scene, cfg)
            if members is not None and members not in groups:
                groups[members] = p
    keys = sorted(groups, key=sorted)
    out = []
    for i in rng.permutation(len(keys))[: cfg.multi_target_refs]:
        members = keys[int(i)]
        out += _phrase_distinct(
            [groups[members]], cfg.generalized_sentences, sorted(members), scene, cfg, rng, "multi"
        )
    return out


def no_target_expressions(
    scene: Scene, cfg: SynthConfig, rng, heldout: Dict[str, str], use_heldout: bool
) -> List[Expression]:
    """
    Up to ``cfg.no_target_refs`` descriptions matching no object: preferably a present
    category in an absent colour (a hard negative), else an absent colour or category.
    Outside testB (``use_heldout`` False) held-out combinations are never named.
    """
    present = {(o.category, o.colour) for o in scene.objects}
    cats = {o.category for o in scene.objects}
    cols = {o.colour for o in scene.objects}
    allowed = lambda cat, col: use_heldout or heldout.get(cat) != col  # noqa: E731
    hard = [
        Program(c, col)
        for c in sorted(cats)
        for col in COLOURS
        if (c, col) not in present and allowed(c, col)
    ]
    easy = [Program(None, col) for col in COLOURS if col not in cols]
    easy += [Program(c, None) for c in CATEGORIES if c not in cats]
    out = []
    for _ in range(cfg.no_target_refs):
        pool = hard if hard and (rng.random() < cfg.hard_negative_prob or not easy) else easy
        if not pool:
            break
        prog = pool.pop(int(rng.integers(len(pool))))
        if evaluate(prog, scene, cfg) != frozenset():
            raise RuntimeError(f"no-target program {prog} denotes objects")  # construction bug
        out += _phrase_distinct(
            [prog], cfg.generalized_sentences, (), scene, cfg, rng, "no_target"
        )
    return out
