"""Writes calibration/prompts.jsonl: the project's INT8 calibration + validation prompt set.

Its output is committed (prompts.jsonl); run `python calibration/make_prompts.py` to regenerate
it (deterministic: seeded, standard library only). The word lists and sentence shapes are
written for this project. Categories follow the compositional ones the ECLIPSE paper evaluates
(T2I-CompBench's): colour, shape, texture binding, spatial and non-spatial relations, complex
scenes. Several sentence shapes per category, varied lengths and styles, a few prompts with
digits, punctuation and accented words so the tokenizer sees them too.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

PER_CATEGORY = 110
VALIDATION_EVERY = 5  # every 5th prompt of a category (after shuffling) is held out: 20 %

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "black", "white", "grey", "brown",
           "teal", "turquoise", "crimson", "navy blue", "lime green", "golden", "silver", "beige", "maroon"]
OBJECTS = ["apple", "umbrella", "bicycle", "teapot", "backpack", "chair", "vase", "lamp", "car", "kite",
           "mug", "balloon", "book", "guitar", "sofa", "boat", "clock", "hat", "bench", "suitcase", "bird",
           "cat", "dog", "horse", "butterfly", "fox", "rabbit", "owl", "tulip", "sunflower", "bowl", "scarf",
           "door", "bus", "train", "tent", "candle", "pillow", "shoe", "fish"]
SHAPES = ["round", "square", "triangular", "oval", "hexagonal", "star-shaped", "heart-shaped", "cylindrical",
          "cubic", "spherical", "rectangular", "pyramid-shaped", "crescent-shaped", "diamond-shaped"]
SHAPE_OBJECTS = ["table", "mirror", "window", "clock", "cake", "cushion", "box", "rug", "plate", "lantern",
                 "pool", "tower", "building", "bottle", "sign", "cookie", "pendant", "tray", "ottoman", "pond"]
TEXTURES = ["wooden", "metallic", "glass", "leather", "fluffy", "knitted", "plastic", "marble", "ceramic",
            "rubber", "velvet", "furry", "stone", "paper", "woven", "rusty", "silk", "concrete", "crystal", "denim"]
TEXTURE_OBJECTS = ["bag", "chair", "cup", "jacket", "table", "teddy bear", "vase", "sculpture", "bowl", "boots",
                   "bench", "box", "lamp", "mask", "spoon", "pillow", "helmet", "fence", "crown", "bottle"]
RELATIONS = ["on the left of", "on the right of", "on top of", "under", "next to", "behind", "in front of",
             "near", "above", "below", "beside", "inside"]
VERBS = [("a man", "reading a newspaper"), ("a girl", "feeding ducks"), ("an old woman", "knitting a scarf"),
         ("a chef", "slicing tomatoes"), ("a cat", "chasing a butterfly"), ("a dog", "catching a frisbee"),
         ("two children", "building a sandcastle"), ("a painter", "painting a mural"), ("a boy", "flying a kite"),
         ("a musician", "playing the violin"), ("a robot", "watering plants"), ("a baker", "pulling bread from an oven"),
         ("a couple", "dancing in the rain"), ("a fisherman", "mending a net"), ("a horse", "drinking from a stream"),
         ("a teacher", "writing on a blackboard"), ("a squirrel", "holding an acorn"), ("a cyclist", "fixing a flat tyre"),
         ("a grandfather", "telling a story to his grandson"), ("a barista", "pouring latte art")]
PLACES = ["in a sunny park", "on a busy city street", "in a cosy kitchen", "on a snowy mountain", "at the beach",
          "in a quiet library", "in a misty forest", "in a desert at sunset", "on a rooftop at night",
          "in a flower market", "inside a train station", "by a frozen lake", "in a greenhouse", "at a café in Paris",
          "in a medieval castle courtyard", "on a small fishing boat"]
STYLES = ["", "", "", ", photorealistic", ", watercolor painting", ", oil painting", ", 35mm photograph",
          ", digital art", ", studio lighting", ", highly detailed", ", in the style of a children's book illustration",
          ", cinematic lighting", ", low-poly 3D render", ", pencil sketch", ", 4k", ", soft morning light"]
NUMBERS = ["two", "three", "four", "five", "2", "3", "a pair of", "several", "a dozen"]
FOODS = ["crème brûlée", "a bowl of ramen", "croissants", "a stack of pancakes", "jalapeño pizza",
         "piña colada", "a slice of Black Forest cake", "crêpes with strawberries", "a plate of sushi", "paella"]


def a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def color(r: random.Random) -> str:
    c1, c2 = r.sample(COLOURS, 2)
    o1, o2 = r.sample(OBJECTS, 2)
    return r.choice([
        f"{a(c1)} {o1} and {a(c2)} {o2}",
        f"{a(c1)} {o1} next to {a(c2)} {o2}{r.choice(STYLES)}",
        f"a photo of {a(c1)} {o1} with {a(c2)} {o2} in the background",
        f"{r.choice(NUMBERS)} {c1} {o1}s and one {c2} {o2}",
        f"{a(c1)} {o1} sitting on {a(c2)} {r.choice(['table', 'carpet', 'blanket', 'shelf'])}",
        f"close-up of {a(c1)} {o1}, {c2} background{r.choice(STYLES)}",
        f"{c1.capitalize()} {o1}; {c2} {o2}.",
        f"a {c1} and {c2} striped {o1}",
    ])


def shape(r: random.Random) -> str:
    s1, s2 = r.sample(SHAPES, 2)
    o1, o2 = r.sample(SHAPE_OBJECTS, 2)
    return r.choice([
        f"{a(s1)} {o1} and {a(s2)} {o2}",
        f"{a(s1)} {o1} in a {r.choice(['modern', 'rustic', 'minimalist', 'Victorian'])} living room{r.choice(STYLES)}",
        f"{a(s1)} {o1} beside {a(s2)} {o2} on a wooden floor",
        f"an architect's model of {a(s1)} {o1}",
        f"{r.choice(NUMBERS)} {s1} {o1}s arranged in a row",
        f"{a(s1)} {o1} made of {r.choice(TEXTURES)} material{r.choice(STYLES)}",
        f"a {s1} {o1} under a {s2} {o2}",
    ])


def texture(r: random.Random) -> str:
    t1, t2 = r.sample(TEXTURES, 2)
    o1, o2 = r.sample(TEXTURE_OBJECTS, 2)
    return r.choice([
        f"{a(t1)} {o1} and {a(t2)} {o2}",
        f"{a(t1)} {o1} on {a(t2)} {o2}{r.choice(STYLES)}",
        f"a {t1} {o1} lying next to a {t2} {o2} in the sunlight",
        f"macro photo of a {t1} {o1}",
        f"{a(t1)} {o1} with a {r.choice(COLOURS)} ribbon{r.choice(STYLES)}",
        f"a shop window full of {t1} {o1}s and {t2} {o2}s",
        f"{t1} {o1}, {t2} {o2}, plain white background",
    ])


def spatial(r: random.Random) -> str:
    o1, o2 = r.sample(OBJECTS, 2)
    rel = r.choice(RELATIONS)
    return r.choice([
        f"{a(o1)} {rel} {a(o2)}",
        f"{a(r.choice(COLOURS) + ' ' + o1)} {rel} {a(o2)}{r.choice(STYLES)}",
        f"a {o1} {rel} a {o2} {r.choice(PLACES)}",
        f"a photo of a {o1} {rel} a {o2}, seen from above",
        f"{r.choice(NUMBERS)} {o1}s {rel} a {o2}",
        f"the {o1} is {rel} the {o2}",
    ])


def non_spatial(r: random.Random) -> str:
    who, doing = r.choice(VERBS)
    who2, doing2 = r.choice(VERBS)
    return r.choice([
        f"{who} {doing}",
        f"{who} {doing} {r.choice(PLACES)}{r.choice(STYLES)}",
        f"{who} is {doing} while {who2} is {doing2}",
        f"{who} {doing}, {r.choice(['smiling', 'looking tired', 'concentrating', 'laughing'])}",
        f"{who} looking at {a(r.choice(OBJECTS))}",
        f"{who} sharing {r.choice(FOODS)} with {who2.replace('a ', 'a friendly ', 1)}",
        f"{who} holding {a(r.choice(COLOURS))} {r.choice(OBJECTS)}{r.choice(STYLES)}",
    ])


def complex_scene(r: random.Random) -> str:
    c1, c2, c3 = r.sample(COLOURS, 3)
    o1, o2, o3 = r.sample(OBJECTS, 3)
    who, doing = r.choice(VERBS)
    return r.choice([
        f"{who} {doing} {r.choice(PLACES)}, with {a(c1)} {o1} on the left and {a(c2)} {o2} on the right{r.choice(STYLES)}",
        f"a {r.choice(TEXTURES)} {o1} on top of a {c1} {o2}, next to {r.choice(NUMBERS)} {c2} {o3}s, {r.choice(PLACES)}",
        f"{r.choice(PLACES).capitalize()}: {who} {doing} while a {c3} {o1} sits under a {r.choice(SHAPES)} {r.choice(SHAPE_OBJECTS)}",
        f"a table set for breakfast with {r.choice(FOODS)}, a {r.choice(TEXTURES)} {r.choice(['teapot', 'jug', 'bowl'])} "
        f"and {r.choice(NUMBERS)} {c1} cups, morning light through the window",
        f"a busy street market at dusk, {a(c1)} awning, {r.choice(NUMBERS)} {c2} lanterns and {who} {doing}",
        f"an isometric illustration of a tiny island with {a(c1)} lighthouse, {a(c2)} {o1} and {a(c3)} {o2}",
        f"{who} {doing} in front of {a(r.choice(SHAPES))} {r.choice(SHAPE_OBJECTS)} made of {r.choice(TEXTURES)} tiles, "
        f"{c1} sky, {r.choice(['rain', 'snow', 'fog', 'autumn leaves'])} falling{r.choice(STYLES)}",
    ])


CATEGORIES = {"color": color, "shape": shape, "texture": texture, "spatial": spatial,
              "non_spatial": non_spatial, "complex": complex_scene}


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def make() -> list[dict]:
    rows, seen = [], set()
    for category, fn in CATEGORIES.items():
        r = random.Random(f"eclipse-export/{category}")
        made = []
        while len(made) < PER_CATEGORY:
            text = fn(r)
            text = text[0].upper() + text[1:] if r.random() < 0.3 else text
            if normalise(text) in seen:
                continue
            seen.add(normalise(text))
            made.append(text)
        for i, text in enumerate(made):
            split = "validation" if i % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "calibration"
            rows.append({"id": f"{category}-{i:04d}", "category": category, "split": split, "prompt": text})
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("prompts.jsonl")
    rows = make()
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} prompts to {out}")
