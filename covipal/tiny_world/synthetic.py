"""The tiny world: seeded scenes of coloured shapes and questions whose answers depend on a few visual tokens.

Images are 128×128 px on four flat quadrant tints (the tint around an object is how the model can tell where it
is). Objects sit in cells of a 16×16 grid of 8-px cells — one cell (small) or 2×2 cells (large) — so each
object covers only a handful of visual tokens of the tiny model's anyres layout, and attributes repeat across
objects so the answer cannot be found by elimination. Grey specks are distractors. Every question picks out its
objects by one attribute (the only object in a quadrant, the only object of a colour, all objects of a colour)
and asks for another, so answering means finding those objects' tokens and reading them. Counting counts the
objects of a colour, not of a shape: every token of an object shows its colour, but one full-resolution token
shows only a quarter of a large object and a base-tile token blurs a small one, so a count of shapes cannot be
read off one token per object (counts of a shape were never learned: docs/tiny_world_probes.md). Videos are
8 frames of 64×64 px in which shapes appear, disappear and move.

Every question records which objects it is about, and `image_token_relevance` / `video_token_relevance` map
those objects to positions in the model's visual token sequence, for the ground-truth oracle pruner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# Bump when what the generator produces changes: cached training splits and pretrained tiny models are keyed by it.
GENERATOR_VERSION = 5

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUADRANT_TINTS = (70, 110, 150, 190)
NUMBERS = ("zero", "one", "two", "three", "four", "five")
TIMES = ("beginning", "middle", "end")
LETTERS = "ABCD"
# The words by which questions pick out objects (what a question row is taught to read in pretraining).
KEY_WORDS = (*COLOURS, *SHAPES, "top", "bottom", "left", "right", "bigger", "first", "moving")

IMAGE_SIZE = 128
CELL = 8
GRID = IMAGE_SIZE // CELL
VIDEO_FRAMES = 8
VIDEO_SIZE = 64
VIDEO_OBJECT = 12

IMAGE_QUESTION_TYPES = ("attribute_at_location", "location_of_attribute", "counting", "existence", "comparison")
VIDEO_QUESTION_TYPES = ("first_to_appear", "when_appears", "moving_object")
YES_NO_TYPES = ("existence",)  # comparison is never learned (chance): not benchmarked
CHOICE_TYPES = ("attribute_at_location", "location_of_attribute", "counting")  # answers among four options
MCQ_PROMPT = "answer with the letter of the correct option."
SHORT_PROMPT = "answer with a single word or phrase."


@dataclass
class SceneObject:
    shape: str
    colour: str
    large: bool
    row: int  # top-left cell of the object on the 16×16 grid
    col: int

    @property
    def cells(self) -> int:
        return 2 if self.large else 1

    @property
    def quadrant(self) -> str:
        return QUADRANTS[(self.row >= GRID // 2) * 2 + (self.col >= GRID // 2)]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1), exclusive ends, of the object's cells."""
        return self.col * CELL, self.row * CELL, (self.col + self.cells) * CELL, (self.row + self.cells) * CELL

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Question:
    kind: str
    question: str
    answer: str  # the short answer
    options: list[str]  # four (or two for yes/no) choices including the answer
    about: list[int]  # indices of the objects the question is about

    def mcq(self) -> tuple[str, str]:
        """Prompt with lettered options and the answer letter."""
        lines = [self.question] + [f"{LETTERS[i]}. {option}" for i, option in enumerate(self.options)]
        return "\n".join([*lines, MCQ_PROMPT]), LETTERS[self.options.index(self.answer)]

    def short(self) -> tuple[str, str]:
        return f"{self.question}\n{SHORT_PROMPT}", self.answer


@dataclass
class Scene:
    objects: list[SceneObject]
    specks: list[tuple[int, int, int]] = field(default_factory=list)  # x, y, grey level

    def render(self) -> Image.Image:
        canvas = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        half = IMAGE_SIZE // 2
        for index, tint in enumerate(QUADRANT_TINTS):
            top, left = (index // 2) * half, (index % 2) * half
            canvas[top : top + half, left : left + half] = tint
        image = Image.fromarray(canvas)
        draw = ImageDraw.Draw(image)
        for x, y, grey in self.specks:
            draw.rectangle([x, y, x + 1, y + 1], fill=(grey, grey, grey))
        for obj in self.objects:
            x0, y0, x1, y1 = obj.box
            draw_shape(draw, obj.shape, COLOURS[obj.colour], (x0 + 1, y0 + 1, x1 - 2, y1 - 2))
        return image


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour, box) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "cross":
        w = max(1, (x1 - x0) // 3)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle([cx - w // 2, y0, cx + (w - 1) // 2 + 1, y1], fill=colour)
        draw.rectangle([x0, cy - w // 2, x1, cy + (w - 1) // 2 + 1], fill=colour)
    else:
        raise ValueError(shape)


def random_scene(rng: np.random.Generator, min_objects: int = 4, max_objects: int = 7) -> Scene:
    """Objects in free cells (one free cell between any two, none across a quadrant border), with specks."""
    count = int(rng.integers(min_objects, max_objects + 1))
    occupied = np.zeros((GRID, GRID), dtype=bool)
    colours = list(COLOURS)
    # Few colours and shapes per scene, so attributes repeat across objects.
    palette = rng.choice(colours, size=min(len(colours), max(2, count - 2)), replace=False).tolist()
    shapes = rng.choice(SHAPES, size=min(len(SHAPES), max(2, count - 3)), replace=False).tolist()
    objects: list[SceneObject] = []
    for _ in range(200):
        if len(objects) == count:
            break
        large = bool(rng.random() < 0.3)
        size = 2 if large else 1
        row, col = int(rng.integers(0, GRID - size + 1)), int(rng.integers(0, GRID - size + 1))
        half = GRID // 2
        if (row < half) != (row + size - 1 < half) or (col < half) != (col + size - 1 < half):
            continue
        if occupied[max(0, row - 1) : row + size + 1, max(0, col - 1) : col + size + 1].any():
            continue
        occupied[row : row + size, col : col + size] = True
        objects.append(SceneObject(str(rng.choice(shapes)), str(rng.choice(palette)), large, row, col))
    specks = [
        (int(rng.integers(0, IMAGE_SIZE - 2)), int(rng.integers(0, IMAGE_SIZE - 2)), int(rng.integers(40, 220)))
        for _ in range(int(rng.integers(4, 12)))
    ]
    return Scene(objects, specks)


def _options(rng: np.random.Generator, answer: str, pool, preferred=()) -> list[str]:
    """Four options in the pool's own order (as benchmarks list numbers, places or colours): the answer, then
    distractors drawn first from `preferred` (present in the scene) when the pool has more than four."""
    others = [x for x in dict.fromkeys(preferred) if x != answer]
    rng.shuffle(others)
    rest = [x for x in pool if x != answer and x not in others]
    rng.shuffle(rest)
    chosen = {answer, *(others + rest)[:3]}
    return [x for x in pool if x in chosen]


def _unique(objects: list[SceneObject], key) -> list[int]:
    values = [key(o) for o in objects]
    return [i for i, v in enumerate(values) if values.count(v) == 1]


def image_question(rng: np.random.Generator, scene: Scene, kind: str) -> Question | None:
    """One question of `kind` about `scene`, or None when the scene does not support it."""
    objs = scene.objects
    present_colours = [o.colour for o in objs]
    present_shapes = [o.shape for o in objs]
    if kind == "attribute_at_location":  # about the only object in a quadrant
        alone = [i for i, o in enumerate(objs) if [p.quadrant for p in objs].count(o.quadrant) == 1]
        if not alone:
            return None
        i = int(rng.choice(alone))
        if rng.random() < 0.5:
            q = f"what colour is the object in the {objs[i].quadrant}?"
            return Question(kind, q, objs[i].colour, _options(rng, objs[i].colour, COLOURS, present_colours), [i])
        q = f"what shape is the object in the {objs[i].quadrant}?"
        return Question(kind, q, objs[i].shape, _options(rng, objs[i].shape, SHAPES, present_shapes), [i])
    if kind == "location_of_attribute":  # where the only object of a colour is
        candidates = _unique(objs, lambda o: o.colour)
        if not candidates:
            return None
        i = int(rng.choice(candidates))
        return Question(kind, f"where is the {objs[i].colour} object?", objs[i].quadrant, list(QUADRANTS), [i])
    if kind == "counting":  # of a colour: one token shows an object's colour, not always its shape (module doc)
        colour = str(rng.choice(present_colours))
        about = [i for i, o in enumerate(objs) if o.colour == colour]
        if len(about) > 4:
            return None
        answer = NUMBERS[len(about)]
        q = f"how many {colour} objects are there?"
        return Question(kind, q, answer, _options(rng, answer, NUMBERS[1:5]), about)
    if kind == "existence":  # whether an object of a colour is there (POPE's question, with colours for categories)
        absent = [c for c in COLOURS if c not in present_colours]
        colour = str(rng.choice(present_colours if rng.random() < 0.5 or not absent else absent))
        about = [i for i, o in enumerate(objs) if o.colour == colour]
        answer = "yes" if about else "no"
        return Question(kind, f"is there a {colour} object?", answer, ["yes", "no"], about)
    if kind == "comparison":
        unique = _unique(objs, lambda o: o.colour)
        pairs = [(i, j) for i in unique for j in unique if i != j and objs[i].large != objs[j].large]
        if not pairs:
            return None
        i, j = pairs[int(rng.integers(len(pairs)))]
        answer = "yes" if objs[i].large else "no"
        q = f"is the {objs[i].colour} object bigger than the {objs[j].colour} object?"
        return Question(kind, q, answer, ["yes", "no"], [i, j])
    raise ValueError(kind)


def first_supported(rng: np.random.Generator, kinds, ask) -> Question | None:
    """`ask(kind)` for the kinds in random order; the first question that is not None (or None)."""
    for kind in rng.permutation(list(kinds)):
        question = ask(str(kind))
        if question is not None:
            return question
    return None


def random_image_question(rng, scene: Scene, kinds=IMAGE_QUESTION_TYPES) -> Question | None:
    """A question of a random kind the scene supports, or None."""
    return first_supported(rng, kinds, lambda kind: image_question(rng, scene, kind))


# -- videos -----------------------------------------------------------------------------------------------------
@dataclass
class VideoObject:
    shape: str
    colour: str
    start: int  # first frame it is visible
    end: int  # last frame it is visible
    x: int
    y: int
    dx: int = 0  # pixels moved per frame

    def position(self, frame: int) -> tuple[int, int]:
        return self.x + self.dx * (frame - self.start), self.y

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class VideoScene:
    objects: list[VideoObject]

    def render(self) -> np.ndarray:
        frames = []
        for frame in range(VIDEO_FRAMES):
            image = Image.new("RGB", (VIDEO_SIZE, VIDEO_SIZE), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            for obj in self.objects:
                if obj.start <= frame <= obj.end:
                    x, y = obj.position(frame)
                    draw_shape(draw, obj.shape, COLOURS[obj.colour], (x, y, x + VIDEO_OBJECT - 1, y + VIDEO_OBJECT - 1))
            frames.append(np.asarray(image))
        return np.stack(frames)


def random_video_scene(rng: np.random.Generator) -> VideoScene:
    count = int(rng.integers(2, 4))
    colours = rng.choice(list(COLOURS), size=count, replace=False).tolist()
    shapes = rng.choice(SHAPES, size=count, replace=True).tolist()
    lanes = rng.choice(3, size=count, replace=False)
    mover = int(rng.integers(count))
    objects = []
    for index in range(count):
        start = int(rng.integers(0, VIDEO_FRAMES - 2))
        end = int(rng.integers(start + 2, VIDEO_FRAMES + 1)) - 1
        moving = index == mover
        dx = 4 if moving else 0
        span = dx * (end - start)
        x = int(rng.integers(0, VIDEO_SIZE - VIDEO_OBJECT - span + 1))
        y = 4 + 20 * int(lanes[index])
        objects.append(VideoObject(shapes[index], colours[index], start, end, x, y, dx))
    return VideoScene(objects)


def when(obj: VideoObject) -> str:
    return TIMES[0] if obj.start <= 2 else (TIMES[1] if obj.start <= 4 else TIMES[2])


def video_question(rng: np.random.Generator, scene: VideoScene, kind: str) -> Question | None:
    objs = scene.objects
    colours = [o.colour for o in objs]
    if kind == "first_to_appear":
        starts = [o.start for o in objs]
        first = int(np.argmin(starts))
        if starts.count(starts[first]) > 1:
            return None
        answer = objs[first].colour
        q = "what colour is the shape that appears first?"
        return Question(kind, q, answer, _options(rng, answer, COLOURS, colours), list(range(len(objs))))
    if kind == "when_appears":
        i = int(rng.integers(len(objs)))
        return Question(kind, f"when does the {objs[i].name} appear?", when(objs[i]), [*TIMES, "never"], [i])
    if kind == "moving_object":
        movers = [i for i, o in enumerate(objs) if o.dx and o.end > o.start]
        if len(movers) != 1:
            return None
        i = movers[0]
        answer = objs[i].colour
        return Question(kind, "what colour is the moving shape?", answer, _options(rng, answer, COLOURS, colours), [i])
    raise ValueError(kind)


def random_video_question(rng, scene: VideoScene, kinds=VIDEO_QUESTION_TYPES) -> Question | None:
    return first_supported(rng, kinds, lambda kind: video_question(rng, scene, kind))


# -- where objects land in the visual token sequence -------------------------------------------------------------
# -- where the pictures lie in a model's visual tokens ---------------------------------------------------------
@dataclass(frozen=True)
class TokenLayout:
    """Where a 128×128 image and an 8-frame 64×64 video lie in one model's visual tokens (`layout.layout_of`
    reads it off a model and its processor). `image_panels`: views of the whole image as token grids (start, rows,
    columns, stride; stride > columns where newline tokens close the rows), coarsest first; a video is `steps`
    grids of `video_rows` × `video_columns` tokens one after another, each covering `frames_per_step` frames;
    `*_tokens` count every visual token, newlines included. `name` tells layouts apart in file names."""

    image_panels: tuple
    image_tokens: int
    frames_per_step: int
    video_rows: int
    video_columns: int
    video_tokens: int
    name: str


# The tiny LLaVA-OneVision's anyres layout: the base tile (the image resized to 64×64: 8×8 tokens of 16 px), then
# the 2×2 crops' full-resolution grid (16×16 tokens of 8 px) row by row, each row closed by a newline; a video is
# 8 frames of 4×4 pooled tokens and one newline. Tests check it against the tiny model (tests/test_tiny_qwen.py).
ONEVISION = TokenLayout(((0, 8, 8, 8), (64, 16, 16, 17)), 336, 1, 4, 4, 129, "llava_onevision")


def _cells(low: float, high: float, cell: float) -> range:
    """The cells of size `cell` that the pixel span [low, high) overlaps."""
    return range(int(low // cell), int(math.ceil(high / cell)))


def image_token_relevance(scene: Scene, about: list[int], layout: TokenLayout = ONEVISION) -> np.ndarray:
    """Bool mask over the visual tokens of one 128×128 image in `layout` that marks, in every panel, the tokens
    overlapping the objects in `about`."""
    mask = np.zeros(layout.image_tokens, dtype=bool)
    for start, rows, columns, stride in layout.image_panels:
        height, width = IMAGE_SIZE / rows, IMAGE_SIZE / columns
        for index in about:
            x0, y0, x1, y1 = scene.objects[index].box
            for r in _cells(y0, y1, height):
                for c in _cells(x0, x1, width):
                    mask[start + r * stride + c] = True
    return mask


def image_token_anchors(scene: Scene, about: list[int], layout: TokenLayout = ONEVISION) -> np.ndarray:
    """Bool mask over the same visual tokens as `image_token_relevance` that marks one token per object in
    `about`: the token of its top-left cell in the finest panel. One token per object, so attending evenly to
    them weighs every object alike whatever its size."""
    start, rows, columns, stride = layout.image_panels[-1]
    mask = np.zeros(layout.image_tokens, dtype=bool)
    for index in about:
        x0, y0, _, _ = scene.objects[index].box
        mask[start + int(y0 // (IMAGE_SIZE / rows)) * stride + int(x0 // (IMAGE_SIZE / columns))] = True
    return mask


def video_token_relevance(scene: VideoScene, about: list[int], layout: TokenLayout = ONEVISION) -> np.ndarray:
    """Bool mask over a video's visual tokens in `layout` marking the cells that the objects in `about` overlap in
    the frames where they are visible (a step of several frames: in any of them)."""
    rows, columns = layout.video_rows, layout.video_columns
    height, width = VIDEO_SIZE / rows, VIDEO_SIZE / columns
    mask = np.zeros(layout.video_tokens, dtype=bool)
    for index in about:
        obj = scene.objects[index]
        for frame in range(obj.start, obj.end + 1):
            x, y = obj.position(frame)
            start = frame // layout.frames_per_step * rows * columns
            for r in _cells(y, y + VIDEO_OBJECT, height):
                for c in _cells(x, x + VIDEO_OBJECT, width):
                    mask[start + min(r, rows - 1) * columns + min(c, columns - 1)] = True
    return mask
