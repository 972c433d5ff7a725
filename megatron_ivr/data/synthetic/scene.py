"""Scenes of coloured shapes and their rendering with PIL.

A scene is a list of objects on a grid; each object has a shape, colour, size, material
and grid cell. Rendering is deterministic: the same scene gives the same pixels.
``metal`` objects get a highlight and a dark rim so that material is visible.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
    "gray": (130, 130, 130),
}
SIZES = ("small", "large")
MATERIALS = ("matte", "metal")
ATTRIBUTES = ("size", "color", "material", "shape")
GRID = 4  # the image is a GRID x GRID board of cells, one object per cell at most
BACKGROUND = (235, 235, 228)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    material: str
    row: int
    col: int

    def phrase(self) -> str:
        """'a large red metal circle'."""
        return f"a {self.size} {self.color} {self.material} {self.shape}"

    def where(self) -> str:
        vertical = ("top", "upper middle", "lower middle", "bottom")[self.row]
        horizontal = ("left", "center-left", "center-right", "right")[self.col]
        return f"{vertical} {horizontal}"

    def matches(self, predicate: dict) -> bool:
        return all(getattr(self, key) == value for key, value in predicate.items())


def random_scene(rng: random.Random, min_objects: int, max_objects: int) -> list[SceneObject]:
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], count)
    objects = [
        SceneObject(shape=rng.choice(SHAPES), color=rng.choice(list(COLORS)), size=rng.choice(SIZES),
                    material=rng.choice(MATERIALS), row=r, col=c)
        for r, c in sorted(cells)
    ]
    return objects


def render_scene(objects: list[SceneObject], image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / GRID
    for obj in objects:
        cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
        radius = cell * (0.44 if obj.size == "large" else 0.24)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        fill = COLORS[obj.color]
        outline = tuple(max(0, v - 90) for v in fill) if obj.material == "metal" else None
        width = max(1, int(cell / 14)) if outline else 0
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill, outline=outline, width=width)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill, outline=outline, width=width)
        else:
            points = [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)]
            draw.polygon(points, fill=fill, outline=outline, width=width)
        if obj.material == "metal":
            glint = radius * 0.3
            gx, gy = cx - radius * 0.3, cy - radius * 0.15
            draw.ellipse((gx - glint, gy - glint, gx + glint, gy + glint), fill=(255, 255, 255))
    return image


def scene_to_json(objects: list[SceneObject]) -> list[dict]:
    return [asdict(o) for o in objects]
