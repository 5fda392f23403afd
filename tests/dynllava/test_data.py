"""The shape-scene generator is deterministic and well-formed; the grader grades known cases right."""

from __future__ import annotations

import re

import pyarrow.parquet as pq
import pytest

from dynllava.cli import main
from dynllava.data.grading import Scores, attribute_counts, normalise_answer, parse_objects, vqa_correct
from dynllava.data.shapes import COLOURS, NUMBER_WORDS, make_example, make_row


def test_rows_are_deterministic_and_independent_of_order():
    a = [make_row(2, i) for i in range(6)]
    b = [make_row(2, i) for i in reversed(range(6))][::-1]
    assert a == b
    assert make_row(0, 3) != make_row(2, 3)  # splits differ


# Where each position word puts an object on the 3x3 grid (row, column), written out here rather than taken from
# the generator's POSITIONS table, so that a generator which draws or names places wrongly fails.
CELL_OF = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "center": (1, 1),
           "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}


def colour_pixels(png: bytes, colour: str, cell: tuple[int, int]) -> int:
    """Pixels of one grid cell of the image within 30 (per channel) of the named colour."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    side = pixels.shape[0] / 3
    (r, c) = cell
    region = pixels[int(side * r): int(side * (r + 1)), int(side * c): int(side * (c + 1))]
    return int((np.abs(region - np.array(COLOURS[colour])).max(-1) <= 30).sum())


def test_descriptions_are_60_to_150_tokens_and_say_what_the_image_shows():
    """Each description parses back to its scene's objects, and each object it names is in the image: its
    colour covers the cell its position names (a small star, the smallest shape, covers 290+ pixels of a
    75x75 cell; a large one 1,000+, and a small circle, the largest small shape, under 930). Counts and
    relations agree with the scene too."""
    for i in range(200):
        row, scene = make_example(1, i, "describe")
        n_tokens = len(re.findall(r"\w+|[^\w\s]", row.reference))
        assert 60 <= n_tokens <= 150, (n_tokens, row.reference)
        objects = parse_objects(row.reference)
        expected = [{"size": o.size, "colour": o.colour, "shape": o.shape, "position": o.position}
                    for o in sorted(scene, key=lambda o: o.cell)]
        assert objects == expected
        for obj in objects:
            covered = colour_pixels(row.image, obj["colour"], CELL_OF[obj["position"]])
            assert covered >= (1000 if obj["size"] == "large" else 250), (row.id, obj, covered)
        n_large = sum(o.size == "large" for o in scene)
        assert row.reference.startswith(f"The image shows {NUMBER_WORDS[len(scene)]} shapes")
        assert f"{NUMBER_WORDS[n_large].capitalize()} {'is' if n_large == 1 else 'are'} large" in row.reference
        for sentence in row.reference.split(". ")[1:-1]:  # "A ... is at the P, left of the red circle"
            relation = re.search(r"is at the ([a-z ]+), (left of|right of|above|below) the (\w+) (\w+)", sentence)
            here = CELL_OF[relation.group(1)]
            there = next(CELL_OF[o["position"]] for o in objects
                         if (o["colour"], o["shape"]) == relation.groups()[2:])
            truth = {"left of": here[0] == there[0] and here[1] < there[1],
                     "right of": here[0] == there[0] and here[1] > there[1],
                     "above": here[0] < there[0], "below": here[0] > there[0]}
            assert truth[relation.group(2)], (row.id, sentence)
        assert attribute_counts(row.reference, row.reference).f1 == 1.0


def test_captions_name_every_object_in_reading_order():
    for i in range(100):
        row, scene = make_example(1, i, "caption")
        objects = sorted(scene, key=lambda o: o.cell)
        assert parse_objects(row.reference) == [{"colour": o.colour, "shape": o.shape} for o in objects]
        assert row.reference.startswith(NUMBER_WORDS[len(scene)] + " shape")


def test_vqa_answers_are_short_right_and_unambiguous():
    """Every question has exactly one right answer in its scene, and the reference is that answer."""
    kinds = set()
    for i in range(300):
        row, scene = make_example(1, i, "vqa")
        kinds.add(row.task)
        question = row.prompt.removesuffix(" Answer briefly.")
        assert 1 <= len(row.reference.split()) <= 2
        if row.task == "vqa-count":
            assert question == "How many shapes are there?" and row.reference == str(len(scene))
        elif row.task == "vqa-colour":
            place = re.fullmatch(r"What colour is the shape at the ([a-z ]+)\?", question).group(1)
            there = [o for o in scene if CELL_OF[place] == divmod(o.cell, 3)]
            assert len(there) == 1 and row.reference == there[0].colour
        elif row.task == "vqa-position":
            colour, shape = re.fullmatch(r"Where is the (\w+) (\w+)\?", question).groups()
            named = [o for o in scene if (o.colour, o.shape) == (colour, shape)]
            assert len(named) == 1 and CELL_OF[row.reference] == divmod(named[0].cell, 3)
        else:
            colour, shape = re.fullmatch(r"Is there an? (\w+) (\w+)\?", question).groups()
            present = any((o.colour, o.shape) == (colour, shape) for o in scene)
            assert row.task == "vqa-exist" and row.reference == ("yes" if present else "no")
    assert kinds == {"vqa-count", "vqa-colour", "vqa-position", "vqa-exist"}


def test_grader_known_cases():
    ref = "three shapes: a red circle, a blue square and a green star."
    assert attribute_counts(ref, ref).f1 == 1.0
    half = attribute_counts("two shapes: a red circle and a blue star.", ref)
    assert (half.true_positive, half.predicted, half.reference) == (3, 4, 6)
    assert attribute_counts("nothing here", ref).f1 == 0.0
    detailed = "A large red circle is at the top left, left of the blue square. A small blue square is at the top."
    assert parse_objects(detailed) == [
        {"size": "large", "colour": "red", "shape": "circle", "position": "top left"},
        {"size": "small", "colour": "blue", "shape": "square", "position": "top"},
    ]
    assert normalise_answer("Four.") == "4" and vqa_correct("Top left", "top left") and not vqa_correct("top", "left")
    scores = Scores()
    scores.add("vqa-count", "3", "three")
    scores.add("vqa-colour", "red", "blue")
    scores.add("caption", ref, ref)
    assert scores.summary()["vqa_accuracy"] == 0.5 and scores.summary()["caption_attribute_f1"] == 1.0


def test_cli_writes_parquet(tmp_path):
    out = tmp_path / "d" / "test.parquet"
    assert main(["data", "shapes", "--n", "7", "--split", "test", "--output", str(out), "--quiet"]) == 0
    table = pq.read_table(out)
    assert table.column_names == ["id", "image", "prompt", "reference", "task"] and table.num_rows == 7
    assert table.column("id").to_pylist()[0] == "s2-0000000"
    assert table.column("image").to_pylist()[0][:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_n(tmp_path, capsys):
    assert main(["data", "shapes", "--n", "0", "--output", str(tmp_path / "x.parquet"), "--quiet"]) == 2
    assert "n must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["caption", "describe", "vqa"])
def test_task_filter(task):
    assert make_row(0, 0, task).task.startswith(task)


def test_question_weights_steer_the_training_mix_only():
    import random

    from dynllava.data.shapes import sample_scene, vqa

    scene = sample_scene(random.Random(0), min_objects=3)
    only_exist = {vqa(scene, random.Random(i), weights=(0, 0, 0, 1))[0] for i in range(20)}
    assert only_exist == {"vqa-exist"}
    uniform = {vqa(scene, random.Random(i))[0] for i in range(40)}
    assert uniform == {"vqa-count", "vqa-colour", "vqa-position", "vqa-exist"}


def test_variety_rows_are_the_plain_rows_on_other_canvases():
    """`--variety`: the same id, prompt, reference and task; a canvas of 160-800 px at 3:4 to 4:3 on a plain
    background; each object's colour in its named cell of the centred square (what a centre crop keeps)."""
    import io

    import numpy as np
    from PIL import Image

    from dynllava.data.shapes import BACKGROUNDS

    sizes, backgrounds = set(), set()
    for i in range(24):
        plain = make_row(2, i)
        varied, scene = make_example(2, i, variety=True)
        assert (varied.id, varied.prompt, varied.reference, varied.task) == (
            plain.id, plain.prompt, plain.reference, plain.task)
        assert varied == make_row(2, i, variety=True)  # deterministic
        image = Image.open(io.BytesIO(varied.image)).convert("RGB")
        w, h = image.size
        assert 160 <= max(w, h) <= 800 and 0.75 - 0.01 <= w / h <= 4 / 3 + 0.01
        assert image.getpixel((0, 0)) in BACKGROUNDS or image.getpixel((w - 1, h - 1)) in BACKGROUNDS
        side = min(w, h)
        square = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
        buf = io.BytesIO()
        square.resize((225, 225)).save(buf, format="PNG")
        background = image.getpixel((0, 0))
        left, top = (w - side) // 2, (h - side) // 2
        outside = [image.crop(box) for box in ((0, 0, left, h), (left + side, 0, w, h), (0, 0, w, top),
                                                (0, top + side, w, h)) if box[2] > box[0] and box[3] > box[1]]
        assert all((np.asarray(part) == background).all() for part in outside), "only background outside the square"
        for o in scene:  # (an object close to the background in colour would be counted with it: not checked)
            if max(abs(a - b) for a, b in zip(COLOURS[o.colour], background)) > 60:
                assert colour_pixels(buf.getvalue(), o.colour, CELL_OF[o.position]) > 50, (i, o)
        sizes.add((w, h))
        backgrounds.add(background)
    assert len(sizes) > 20 and len(backgrounds) >= 4, "canvases and backgrounds vary"


def test_training_scenes_on_varied_canvases_only_when_asked():
    """variety 0 draws exactly the plain training scenes (the shipped recipe is unchanged); variety 1 draws
    every scene on a varied canvas; a share in between draws some of each; outside [0, 1] is refused."""
    import random

    from dynllava.train.base import BaseTrainConfig
    from dynllava.train.conversations import shape_turns

    def sizes(variety: float) -> list[tuple[int, int]]:
        return [shape_turns(random.Random(0), 0, i, variety=variety)[0].size for i in range(40)]

    plain = [shape_turns(random.Random(0), 0, i)[0] for i in range(5)]
    assert [shape_turns(random.Random(0), 0, i, variety=0.0)[0].tobytes() for i in range(5)] == [
        p.tobytes() for p in plain]
    assert set(sizes(0.0)) == {plain[0].size} and plain[0].size[0] == plain[0].size[1]
    assert plain[0].size not in sizes(1.0)
    half = sizes(0.5)
    assert 5 < sum(s == plain[0].size for s in half) < 35
    with pytest.raises(ValueError, match="variety"):
        BaseTrainConfig(variety=1.5)
