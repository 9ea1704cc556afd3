"""Procedural scenes with exact captions: the demo model's whole world.

A scene is one flat-coloured shape on a flat background, e.g. "a red star on a blue background, on the left".
Design choices:
  * Captions have a fixed word order ("a <color> <shape> on a <background> background[, <position>]") so every
    concept sits at the same token position; a frozen random text encoder is then enough to tell captions apart.
  * The split is by caption, not by image: `heldout` captions (a fixed fifth, chosen by a CRC of the caption) are
    never drawn for training, so the evaluator measures composition of seen concepts, not memorisation.
  * `NOVEL_COLOR` ("pink") is left out of both splits; the LoRA demonstration teaches it afterwards.
  * Rendering is deterministic from (scene, seed): small jitter in size and position, 4x supersampled edges.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (250, 225, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (130, 40, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (255, 120, 200),
}
NOVEL_COLOR = "pink"  # never in base training: the LoRA demonstration's new concept
BASE_COLORS = tuple(c for c in COLORS if c != NOVEL_COLOR)
SHAPES = ("circle", "square", "triangle", "star")
# Position phrase -> shape centre as fractions of the image side; None means centred.
POSITIONS: dict[str | None, tuple[float, float]] = {
    None: (0.5, 0.5),
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
}
RADIUS = 0.2  # shape radius as a fraction of the image side, before jitter
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    position: str | None = None

    @property
    def caption(self) -> str:
        shape = f"{_article(self.color)} {self.color} {self.shape}"
        text = f"{shape} on {_article(self.background)} {self.background} background"
        return f"{text}, {self.position}" if self.position else text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_scenes(colors: tuple[str, ...] = BASE_COLORS) -> list[Scene]:
    """Every caption with a shape color in `colors`, on any other base color as background."""
    return [
        Scene(shape, color, background, position)
        for shape in SHAPES
        for color in colors
        for background in BASE_COLORS
        if background != color
        for position in POSITIONS
    ]


def is_heldout(scene: Scene) -> bool:
    return zlib.crc32(scene.caption.encode()) % 5 == 0


def split(split_name: str, colors: tuple[str, ...] = BASE_COLORS) -> list[Scene]:
    """The "train" or "heldout" captions, in a fixed order."""
    if split_name not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split_name!r}")
    return [s for s in all_scenes(colors) if is_heldout(s) == (split_name == "heldout")]


def render(scene: Scene, seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `scene`; the same (scene, seed, size) always gives the same pixels."""
    rng = random.Random(f"{scene.caption}|{seed}")
    big = size * SUPERSAMPLE
    fx, fy = POSITIONS[scene.position]
    cx = (fx + rng.uniform(-0.03, 0.03)) * big
    cy = (fy + rng.uniform(-0.03, 0.03)) * big
    r = RADIUS * big * rng.uniform(0.9, 1.1)
    image = Image.new("RGB", (big, big), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        h = 0.85 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif scene.shape == "triangle":
        draw.regular_polygon((cx, cy, 1.2 * r), 3, fill=fill)  # pointing up, centred on its centroid
    elif scene.shape == "star":
        draw.polygon(star_points(cx, cy, 1.25 * r), fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}; known shapes: {', '.join(SHAPES)}")
    return image.resize((size, size), Image.Resampling.BOX)


def star_points(cx: float, cy: float, outer: float, inner_ratio: float = 0.45) -> list[tuple[float, float]]:
    """A five-pointed star with one point straight up."""
    points = []
    for k in range(10):
        radius = outer if k % 2 == 0 else outer * inner_ratio
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def sample(scenes: list[Scene], n: int, seed: int) -> list[tuple[Scene, int]]:
    """`n` (scene, render seed) pairs drawn with replacement from `scenes`, reproducibly."""
    rng = random.Random(seed)
    return [(rng.choice(scenes), rng.randrange(2**31)) for _ in range(n)]
