"""Caption grammar with paraphrases, and its parser.

`caption(spec, rng)` says a PromptSpec in one of many wordings ("a red circle on the left", "one crimson
disk, left side"); `parse(text)` reads any caption of the grammar back to the same spec. The reward and the
judge take plain prompt strings (the Reward protocol), so they parse; a test holds parse(caption(s)) == s.
"""

from __future__ import annotations

import re

import numpy as np

from flowbp_core.world.spec import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, ObjectSpec, PromptSpec

COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "tangerine"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure", "cobalt"),
    "purple": ("purple", "violet"),
}
SHAPE_WORDS: dict[str, tuple[tuple[str, str], ...]] = {  # (singular, plural)
    "circle": (("circle", "circles"), ("disk", "disks"), ("dot", "dots")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"), ("wedge", "wedges")),
}
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left", "{sep}left side", "in the left part"),
    "right": ("on the right", "at the right", "{sep}right side", "in the right part"),
    "top": ("at the top", "near the top", "{sep}top side", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "{sep}bottom side", "in the lower part"),
    "centre": ("in the centre", "in the middle", "{sep}centred", "at the center"),
}
COUNT_WORDS: dict[int, tuple[str, ...]] = {
    1: ("one", "a single", "exactly one"), 2: ("two", "a pair of"), 3: ("three", "a trio of")
}
BACKGROUND_PHRASES = ("on a {bg} background", "against a {bg} backdrop")

# Reverse lexicons for the parser.
_COLOUR_OF = {w: c for c, ws in COLOUR_WORDS.items() for w in ws}
_SHAPE_OF = {w: s for s, pairs in SHAPE_WORDS.items() for p in pairs for w in p}
_COUNT_OF = {w: n for n, ws in COUNT_WORDS.items() for w in ws}
_POSITION_OF = {p.replace("{sep}", "").strip(): pos for pos, ps in POSITION_PHRASES.items() for p in ps}

_ARTICLES_ONE = ("a", "one")  # "one" only where the task is not counting (see caption())


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _noun(shape: str, rng: np.random.Generator, plural: bool = False) -> str:
    pair = _pick(rng, SHAPE_WORDS[shape])
    return pair[1] if plural else pair[0]


def _adj(colour: str, rng: np.random.Generator) -> str:
    return _pick(rng, COLOUR_WORDS[colour])


def _position(pos: str, rng: np.random.Generator) -> str:
    phrase = _pick(rng, POSITION_PHRASES[pos])
    return phrase.replace("{sep}", ", ") if "{sep}" in phrase else " " + phrase


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: PromptSpec, rng: np.random.Generator) -> str:
    """One wording of `spec`, chosen by `rng`."""
    t, objs = spec.task, spec.objects
    if t == "single_object":
        noun = _noun(objs[0].shape, rng)
        text = _pick(rng, (f"{_article(noun)} {noun}", f"a picture of {_article(noun)} {noun}", f"one {noun}"))
    elif t == "two_objects":
        a, b = (objs if rng.random() < 0.5 else objs[::-1])
        na, nb = _noun(a.shape, rng), _noun(b.shape, rng)
        text = _pick(rng, (f"{_article(na)} {na} and {_article(nb)} {nb}",
                           f"{_article(na)} {na} with {_article(nb)} {nb}"))
    elif t == "counting":
        o = objs[0]
        num = _pick(rng, COUNT_WORDS[spec.count])
        text = f"{num} {_adj(o.colour, rng)} {_noun(o.shape, rng, plural=spec.count > 1)}"
    elif t == "colours":
        o = objs[0]
        adj = _adj(o.colour, rng)
        noun = _noun(o.shape, rng)
        text = _pick(rng, (f"{_article(adj)} {adj} {noun}", f"{adj} {noun}", f"a {noun} coloured {adj}"))
    elif t == "position":
        o = objs[0]
        adj = _adj(o.colour, rng)
        art = _pick(rng, (_article(adj), "one"))
        text = f"{art} {adj} {_noun(o.shape, rng)}{_position(o.position, rng)}"
    elif t == "colour_attr":
        a, b = (objs if rng.random() < 0.5 else objs[::-1])
        aa, ab = _adj(a.colour, rng), _adj(b.colour, rng)
        na, nb = _noun(a.shape, rng), _noun(b.shape, rng)
        text = _pick(rng, (f"{_article(aa)} {aa} {na} and {_article(ab)} {ab} {nb}",
                           f"{_article(aa)} {aa} {na} next to {_article(ab)} {ab} {nb}"))
    else:  # PromptSpec validates task; this is unreachable
        raise ValueError(f"task={t!r}")
    if spec.background is not None:
        text += " " + _pick(rng, BACKGROUND_PHRASES).format(bg=spec.background)
    return text


class CaptionParseError(ValueError):
    pass


_TOKEN = re.compile(r"[a-z]+")


def parse(text: str) -> PromptSpec:
    """Read a caption of this grammar back to its PromptSpec (objects of two-object tasks in canonical order)."""
    low = text.lower().strip()
    background = None
    for bg in BACKGROUNDS:
        if re.search(rf"\b{bg} (background|backdrop)\b", low):
            background = bg
            low = re.sub(rf"\b(on|against) a {bg} (background|backdrop)\b", " ", low)
    position = None
    for phrase, pos in sorted(_POSITION_OF.items(), key=lambda kv: -len(kv[0])):
        if re.search(rf"\b{re.escape(phrase)}\b", low):
            position = pos
            low = re.sub(rf"\b{re.escape(phrase)}\b", " ", low)
            break
    count = None
    for phrase, n in sorted(_COUNT_OF.items(), key=lambda kv: -len(kv[0])):
        if re.match(rf"{re.escape(phrase)}\b", low):
            count = n
            break
    words = _TOKEN.findall(low)
    colours = [_COLOUR_OF[w] for w in words if w in _COLOUR_OF]
    shapes = [_SHAPE_OF[w] for w in words if w in _SHAPE_OF]
    plural = any(w in _SHAPE_OF and w != _noun_singular(w) for w in words)
    if not shapes:
        raise CaptionParseError(f"prompt {text!r} names no shape (one of {SHAPES} or a synonym)")
    if len(shapes) > 2 or len(colours) > 2:
        raise CaptionParseError(f"prompt {text!r} names more than two objects; "
                                "the world has 1-3 of one kind or two kinds")
    if len(shapes) == 2:
        if colours and len(colours) != 2:
            raise CaptionParseError(f"prompt {text!r}: give both objects a colour or neither")
        objs = [ObjectSpec(shape=s, colour=(colours[i] if colours else None)) for i, s in enumerate(shapes)]
        if objs[0].shape == objs[1].shape:
            raise CaptionParseError(f"prompt {text!r}: the two objects must have different shapes")
        objs.sort(key=lambda o: o.shape)
        return PromptSpec("colour_attr" if colours else "two_objects", tuple(objs), background=background)
    shape = shapes[0]
    colour = colours[0] if colours else None
    if position is not None:
        if colour is None:
            raise CaptionParseError(f"prompt {text!r}: a positioned object needs a colour in this grammar")
        return PromptSpec("position", (ObjectSpec(shape=shape, colour=colour, position=position),),
                          background=background)
    if colour is None:
        return PromptSpec("single_object", (ObjectSpec(shape=shape),), background=background)
    if count is not None and (count > 1 or not plural) and _is_counting(low, count):
        return PromptSpec("counting", (ObjectSpec(shape=shape, colour=colour),), count=count, background=background)
    return PromptSpec("colours", (ObjectSpec(shape=shape, colour=colour),), background=background)


def _noun_singular(word: str) -> str:
    for pairs in SHAPE_WORDS.values():
        for sing, plur in pairs:
            if word in (sing, plur):
                return sing
    return word


def _is_counting(low: str, count: int) -> bool:
    # "one red circle" is a counting prompt; "a red circle" is a colour prompt ("a" is not a count word here).
    return not low.startswith("a ") or low.startswith(("a single", "a pair of", "a trio of"))


__all__ = ["caption", "parse", "CaptionParseError", "COLOUR_WORDS", "SHAPE_WORDS", "POSITION_PHRASES", "COUNT_WORDS"]
# Guard: the lexicons must cover the world's vocabulary.
assert set(COLOUR_WORDS) == set(COLOURS) and set(SHAPE_WORDS) == set(SHAPES) and set(POSITION_PHRASES) == set(POSITIONS)
