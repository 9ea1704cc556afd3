"""Deterministic adherence check for demo images: does the picture show the shape, colour, background and
position its caption names?

No learned judge: `read_image` segments the image and measures it.
  * a 3x3 median filter first, so that speckle does not move bounding boxes;
  * background = nearest named colour to the median of the 2-pixel border;
  * the shape = the largest 4-connected region of pixels closer to the foreground colour than to the background
    (the foreground colour is the median of the pixels farthest from the background), so blurry edges split
    at the midpoint;
  * shape kind from three scale-free measurements of that region: extent (area / bounding-box area), solidity
    (area / convex-hull area) and the centroid's vertical offset in the box (a triangle pointing up is bottom-heavy).
    The nearest prototype wins; prototypes are the measurements of `scenes.render` drawings;
  * position from the centroid's offset from the image centre.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from featherflux.demo import scenes

# (extent, solidity, vertical centroid offset) measured on `scenes.render` drawings at 64 px.
SHAPE_PROTOTYPES: dict[str, tuple[float, float, float]] = {
    "circle": (0.785, 0.955, 0.0),
    "square": (1.0, 1.0, 0.0),
    "triangle": (0.53, 0.91, 0.16),
    "star": (0.415, 0.585, 0.05),
}
MIN_AREA = 0.01  # of the image; anything smaller is "no shape"
CENTRE_TOLERANCE = 0.11  # centroid offset (fraction of the side) still counted as centred


@dataclass(frozen=True)
class Reading:
    """What the evaluator sees in one image. `shape` is None when no shape was found."""

    shape: str | None
    color: str | None
    background: str
    position: str | None  # one of scenes.POSITIONS' keys


@dataclass(frozen=True)
class Report:
    n: int
    adherence: float  # fraction of images where every stated attribute matches
    shape: float
    color: float
    background: float
    position: float  # over the prompts that state a position
    failures: list[tuple[str, Reading]]

    def summary(self) -> str:
        return (
            f"adherence {self.adherence:.1%} over {self.n} held-out prompts "
            f"(shape {self.shape:.1%}, color {self.color:.1%}, background {self.background:.1%}, "
            f"position {self.position:.1%})"
        )


def nearest_color(rgb: np.ndarray) -> str:
    names = list(scenes.COLORS)
    table = np.array([scenes.COLORS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def read_image(image: Image.Image) -> Reading:
    image = image.convert("RGB").resize((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)).filter(ImageFilter.MedianFilter(3))
    pixels = np.asarray(image, dtype=np.float32)
    size = pixels.shape[0]
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = nearest_color(bg)
    dist_bg = np.sqrt(((pixels - bg) ** 2).sum(-1))
    far = dist_bg > max(40.0, np.percentile(dist_bg, 90) * 0.5)
    if far.sum() < MIN_AREA * size * size:
        return Reading(None, None, background, None)
    fg = np.median(pixels[far], axis=0)
    closer_to_fg = ((pixels - fg) ** 2).sum(-1) < ((pixels - bg) ** 2).sum(-1)
    mask = largest_component(closer_to_fg)
    if mask.sum() < MIN_AREA * size * size:
        return Reading(None, None, background, None)
    color = nearest_color(np.median(pixels[mask & far], axis=0) if (mask & far).any() else fg)
    return Reading(classify_shape(mask), color, background, position_of(mask))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected True region of a 2-D boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, count = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            count += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if count > best_size:
            best, best_size = label, count
    return labels == best


def shape_features(mask: np.ndarray) -> tuple[float, float, float]:
    """(extent, solidity, vertical centroid offset) of a boolean region; see the module docstring."""
    ys, xs = np.nonzero(mask)
    area = float(len(ys))
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    extent = area / float((bottom - top) * (right - left))
    # Hull over pixel corners, so that a filled square has solidity exactly 1.
    corners = {(x + dx, y + dy) for y, x in zip(ys.tolist(), xs.tolist()) for dx in (0, 1) for dy in (0, 1)}
    solidity = area / polygon_area(convex_hull(sorted(corners)))
    y_offset = ((ys.mean() + 0.5) - (top + bottom) / 2) / (bottom - top)
    return extent, solidity, float(y_offset)


def classify_shape(mask: np.ndarray) -> str:
    features = np.array(shape_features(mask))
    weights = np.array([1.0, 1.0, 2.0])  # the offset's range is about half the others'
    return min(SHAPE_PROTOTYPES, key=lambda s: float((weights * (features - SHAPE_PROTOTYPES[s]) ** 2).sum()))


def position_of(mask: np.ndarray) -> str | None:
    ys, xs = np.nonzero(mask)
    dx = (xs.mean() + 0.5) / mask.shape[1] - 0.5
    dy = (ys.mean() + 0.5) / mask.shape[0] - 0.5
    if max(abs(dx), abs(dy)) < CENTRE_TOLERANCE:
        return None
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def convex_hull(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Andrew's monotone chain over sorted points; counter-clockwise, no repeated end point."""

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def polygon_area(polygon: list[tuple[int, int]]) -> float:
    n = len(polygon)
    twice = sum(polygon[i][0] * polygon[(i + 1) % n][1] - polygon[(i + 1) % n][0] * polygon[i][1] for i in range(n))
    return abs(twice) / 2.0


def matches(reading: Reading, scene: scenes.Scene) -> dict[str, bool]:
    """Per-attribute verdicts; position is judged only when the caption states one."""
    verdict = {
        "shape": reading.shape == scene.shape,
        "color": reading.color == scene.color,
        "background": reading.background == scene.background,
    }
    if scene.position is not None:
        verdict["position"] = reading.position == scene.position
    return verdict


def score(images: Sequence[Image.Image], prompts: Sequence[scenes.Scene]) -> Report:
    hits = {"shape": 0, "color": 0, "background": 0, "position": 0}
    with_position, all_ok, failures = 0, 0, []
    for image, scene in zip(images, prompts, strict=True):
        reading = read_image(image)
        verdict = matches(reading, scene)
        for key, ok in verdict.items():
            hits[key] += ok
        with_position += scene.position is not None
        if all(verdict.values()):
            all_ok += 1
        else:
            failures.append((scene.caption, reading))
    n = len(prompts)
    return Report(
        n=n,
        adherence=all_ok / n,
        shape=hits["shape"] / n,
        color=hits["color"] / n,
        background=hits["background"] / n,
        position=hits["position"] / max(with_position, 1),
        failures=failures,
    )


def heldout_prompts(n: int, colors: tuple[str, ...] = scenes.BASE_COLORS) -> list[scenes.Scene]:
    """The first `n` held-out captions in a fixed shuffled order (cycled if `n` exceeds the split)."""
    prompts = scenes.split("heldout", colors)
    random.Random(0).shuffle(prompts)
    return [prompts[i % len(prompts)] for i in range(n)]


def evaluate(
    generate: Callable[[list[str], int], list[Image.Image]],
    n: int = 200,
    colors: tuple[str, ...] = scenes.BASE_COLORS,
    batch_size: int = 25,
) -> Report:
    """Render `n` held-out prompts with `generate(captions, seed)` and score them."""
    prompts = heldout_prompts(n, colors)
    images: list[Image.Image] = []
    for start in range(0, n, batch_size):
        batch = prompts[start : start + batch_size]
        images.extend(generate([s.caption for s in batch], start))
    return score(images, prompts)


class PipelineGenerator:
    """A pipeline as `evaluate`'s `generate(captions, offset)`; image i of a call is seeded seed + offset + i. Keeps
    the DiT passes each call ran (`dit_calls`), to measure step caching."""

    def __init__(self, pipe, num_inference_steps: int | None = None, seed: int = 0, **call):
        self.pipe, self.seed, self.call = pipe, seed, call
        self.steps = num_inference_steps or pipe.family.default_steps
        self.dit_calls: list[int] = []

    def __call__(self, captions: list[str], offset: int) -> list[Image.Image]:
        generators = [torch.Generator().manual_seed(self.seed + offset + i) for i in range(len(captions))]
        size = scenes.IMAGE_SIZE
        result = self.pipe(
            prompt=captions, height=size, width=size, num_inference_steps=self.steps, generator=generators, **self.call
        )
        self.dit_calls.append(result.dit_calls)
        return result.images
