"""Procedural shape scenes: 1-6 objects (shape, colour, size, grid cell), some overlap and clutter, with a short
caption, a detailed description (60-150 tokens) and VQA questions (count, colour, position, existence).

Deterministic: row i of a split is generated from (split seed, i) alone, so any slice can be regenerated.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
    "purple": (140, 60, 180), "orange": (245, 130, 30), "black": (25, 25, 25), "white": (250, 250, 250),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
TASKS = ("caption", "describe", "vqa")
IMAGE_SIZE = 224


@dataclass(frozen=True)
class SceneObject:
    """One object: its attributes (words of the vocabulary) and its grid cell (row, col in 0..2)."""

    shape: str
    colour: str
    size: str
    cell: int  # index into POSITIONS

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self, with_size: bool = True) -> str:
        return f"{self.size} {self.colour} {self.shape}" if with_size else f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Row:
    """One dataset row: the Parquet columns."""

    id: str
    image: bytes  # PNG
    prompt: str
    reference: str
    task: str  # caption | describe | vqa-count | vqa-colour | vqa-position | vqa-exist


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 6) -> list[SceneObject]:
    """Distinct cells; (colour, shape) pairs unique within a scene so every object can be named unambiguously."""
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(range(9), n)
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    return [SceneObject(shape=s, colour=c, size=rng.choice(SIZES), cell=cell) for cell, (c, s) in zip(cells, pairs)]


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, cx: float, cy: float, r: float,
                background: tuple[int, int, int] | None = None) -> None:
    fill = COLOURS[obj.colour]
    close = background is not None and max(abs(a - b) for a, b in zip(fill, background)) < 60
    outline = (90, 90, 90) if obj.colour == "white" else (160, 160, 160) if close else None
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline)
    elif obj.shape == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill, outline=outline)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill, outline=outline)
    elif obj.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill, outline=outline)
    elif obj.shape == "star":
        import math

        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        draw.polygon(pts, fill=fill, outline=outline)
    else:  # cross
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill, outline=outline)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill, outline=outline)


def render(scene: list[SceneObject], rng: random.Random, size: int = IMAGE_SIZE,
           background: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw the scene on a tinted (or the given plain `background`), cluttered background; objects jitter
    inside their cell and may overlap; an object close to the given background in colour gets an outline."""
    base = tuple(rng.randint(150, 215) for _ in range(3))  # drawn either way: the rest of the scene is the same
    img = Image.new("RGB", (size, size), background or base)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 10)):  # clutter: thin grey strokes
        grey = rng.randint(110, 190)
        pts = [(rng.uniform(0, size), rng.uniform(0, size)) for _ in range(2)]
        draw.line(pts, fill=(grey, grey, grey), width=rng.randint(1, 2))
    cell = size / 3
    for obj in scene:
        row, col = divmod(obj.cell, 3)
        r = cell * (0.40 if obj.size == "large" else 0.22)
        cx = (col + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        _draw_shape(draw, obj, cx, cy, r, background)
    return img.filter(ImageFilter.GaussianBlur(0.4))


BACKGROUNDS = ((255, 255, 255), (0, 0, 0), (245, 240, 225), (40, 45, 60), (200, 215, 235), (120, 120, 120))


def render_varied(scene: list[SceneObject], rng: random.Random, canvas_rng: random.Random) -> Image.Image:
    """The scene on a canvas of another size, aspect ratio and background (`data shapes --variety`): a long
    side of 160-800 px at 3:4 to 4:3, a plain background (white, black, cream, dark blue, light blue or grey),
    the scene's 3x3 grid in the centred square a centre-cropping processor keeps, so the references (positions
    included) still describe what the model sees. `canvas_rng` draws the canvas; `rng` the scene's jitter and
    clutter, as render does."""
    long_side = canvas_rng.randint(160, 800)
    ratio = canvas_rng.uniform(0.75, 4 / 3)
    width, height = (long_side, round(long_side / ratio)) if ratio >= 1 else (round(long_side * ratio), long_side)
    background = canvas_rng.choice(BACKGROUNDS)
    side = min(width, height)
    canvas = Image.new("RGB", (width, height), background)
    canvas.paste(render(scene, rng, side, background), ((width - side) // 2, (height - side) // 2))
    return canvas


def scene_image(scene: list[SceneObject], rng: random.Random, canvas_seed: str, variety: float = 0.0,
                ) -> Image.Image:
    """The scene as render draws it or, with probability `variety`, on a varied canvas (render_varied). The
    choice and the canvas come from their own seeds, so variety 0 draws exactly what render draws."""
    if variety > 0 and random.Random(f"{canvas_seed}/use").random() < variety:
        return render_varied(scene, rng, random.Random(canvas_seed))
    return render(scene, rng)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(scene: list[SceneObject]) -> str:
    """Short caption: every object's colour and shape, in reading order."""
    objs = sorted(scene, key=lambda o: o.cell)
    return f"{NUMBER_WORDS[len(objs)]} {'shape' if len(objs) == 1 else 'shapes'}: " + \
        _join([f"a {o.phrase(with_size=False)}" for o in objs]) + "."


def _relation(a: SceneObject, b: SceneObject) -> str:
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    if ra == rb:
        return "left of" if ca < cb else "right of"
    return "above" if ra < rb else "below"


def describe(scene: list[SceneObject]) -> str:
    """Detailed description: count, one sentence per object (size, colour, shape, position, and where it is
    relative to its neighbour in reading order), then how many are large and small."""
    objs = sorted(scene, key=lambda o: o.cell)
    n = len(objs)
    parts = [f"The image shows {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'} on a plain background."]
    for i, o in enumerate(objs):
        sentence = f"A {o.phrase()} is at the {o.position}"
        if n > 1:
            other = objs[i + 1] if i + 1 < n else objs[i - 1]
            sentence += f", {_relation(o, other)} the {other.phrase(with_size=False)}"
        parts.append(sentence + ".")
    n_large = sum(o.size == "large" for o in objs)
    parts.append(f"{NUMBER_WORDS[n_large].capitalize()} {'is' if n_large == 1 else 'are'} large and "
                 f"{NUMBER_WORDS[n - n_large]} {'is' if n - n_large == 1 else 'are'} small.")
    return " ".join(parts)


QUESTION_KINDS = ("count", "colour", "position", "exist")


def vqa(scene: list[SceneObject], rng: random.Random, weights: tuple[float, ...] | None = None
        ) -> tuple[str, str, str]:
    """One question with a short answer: (task, question, answer). Kinds are uniform unless `weights` (one per
    QUESTION_KINDS) are given; the splits' rows always use the uniform draw."""
    kind = rng.choice(QUESTION_KINDS) if weights is None else rng.choices(QUESTION_KINDS, weights)[0]
    obj = rng.choice(scene)
    if kind == "count":
        return "vqa-count", "How many shapes are there?", str(len(scene))
    if kind == "colour":
        return "vqa-colour", f"What colour is the shape at the {obj.position}?", obj.colour
    if kind == "position":
        return "vqa-position", f"Where is the {obj.phrase(with_size=False)}?", obj.position
    present = {(o.colour, o.shape) for o in scene}
    if rng.random() < 0.5:
        return "vqa-exist", f"Is there a {obj.phrase(with_size=False)}?", "yes"
    absent = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
    return "vqa-exist", f"Is there a {absent[0]} {absent[1]}?", "no"


def cell_labels(scene: list[SceneObject]) -> tuple[list[int], list[int], list[int]]:
    """Per grid cell (9, reading order): colour, shape and size class, 0 = empty cell. For vision pretraining."""
    colour, shape, size = [0] * 9, [0] * 9, [0] * 9
    for o in scene:
        colour[o.cell] = 1 + list(COLOURS).index(o.colour)
        shape[o.cell] = 1 + SHAPES.index(o.shape)
        size[o.cell] = 1 + SIZES.index(o.size)
    return colour, shape, size


PROMPTS = {"caption": "Describe the image briefly.", "describe": "Describe the image in detail."}


def make_row(split_seed: int, index: int, task: str | None = None, variety: bool = False) -> Row:
    """Row `index` of the split with seed `split_seed` (task drawn 1:1:2 caption/describe/vqa unless given);
    `variety`: the same scene and text on another canvas (render_varied)."""
    return make_example(split_seed, index, task, variety)[0]


def make_example(split_seed: int, index: int, task: str | None = None, variety: bool = False,
                 ) -> tuple[Row, list[SceneObject]]:
    """make_row's row together with the scene it was drawn from (for checking the generator against itself)."""
    rng = random.Random(f"shapes/{split_seed}/{index}")
    task = task or rng.choice(("caption", "describe", "vqa", "vqa"))
    scene = sample_scene(rng, min_objects=3 if task == "describe" else 1)
    if variety:  # the canvas has its own random stream: the scene, its text and the row's draws stay the same
        img = render_varied(scene, rng, random.Random(f"shapes-canvas/{split_seed}/{index}"))
    else:
        img = render(scene, rng)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    if task == "vqa":
        task, prompt, reference = vqa(scene, rng)
        prompt += " Answer briefly."
    else:
        prompt, reference = PROMPTS[task], (caption(scene) if task == "caption" else describe(scene))
    row = Row(id=f"s{split_seed}-{index:07d}", image=buf.getvalue(), prompt=prompt, reference=reference, task=task)
    return row, scene


def vocabulary_text() -> str:
    """Every word the generator can write, for building a closed-vocabulary tokenizer."""
    words = [*SHAPES, *COLOURS, *SIZES, *(w for p in POSITIONS for w in p.split()), *NUMBER_WORDS,
             *(str(i) for i in range(10))]
    return " ".join(words)


def write_parquet(path: str, n: int, split_seed: int, task: str | None = None, chunk_rows: int = 500,
                  progress: bool = True, variety: bool = False) -> int:
    """Write rows 0..n-1 of a split to Parquet (columns id, image, prompt, reference, task), in row groups of
    chunk_rows so memory stays flat. Returns the number of rows written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("prompt", pa.string()),
                        ("reference", pa.string()), ("task", pa.string())])
    written = 0
    with pq.ParquetWriter(path, schema) as writer, tqdm(total=n, desc="shapes", unit="row",
                                                         disable=not progress) as bar:
        for start in range(0, n, chunk_rows):
            rows = [make_row(split_seed, i, task, variety) for i in range(start, min(n, start + chunk_rows))]
            columns = {name: [getattr(r, name) for r in rows] for name in schema.names}
            writer.write_table(pa.table(columns, schema=schema))
            written += len(rows)
            bar.update(len(rows))
    return written
