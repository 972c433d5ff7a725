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


# the value an attribute takes in every object when it does not vary (``synthetic.attributes``)
FIXED = {"size": "large", "material": "matte"}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    material: str
    row: int
    col: int
    shown: tuple = ATTRIBUTES  # the attributes that vary in this task, and so are named
    grid: int = GRID  # the board is grid x grid cells

    def phrase(self) -> str:
        """'a large red metal circle' (only the attributes that vary are named)."""
        words = [getattr(self, key) for key in ("size", "color", "material") if key in self.shown]
        return "a " + " ".join(words + [self.shape])

    def where(self) -> str:
        return cell_name(self.row, self.col, self.grid)

    def matches(self, predicate: dict) -> bool:
        return all(getattr(self, key) == value for key, value in predicate.items())


_ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom"), 4: ("top", "upper middle", "lower middle", "bottom")}
_COLS = {2: ("left", "right"), 3: ("left", "center", "right"), 4: ("left", "center-left", "center-right", "right")}


def cell_name(row: int, col: int, grid: int) -> str:
    """'top left', 'upper middle center-right', ... for a 2x2, 3x3 or 4x4 board."""
    return f"{_ROWS[grid][row]} {_COLS[grid][col]}"


def attribute_pools(attributes: tuple = ATTRIBUTES, num_colors: int = len(COLORS)) -> dict[str, list[str]]:
    """The values each varying attribute draws from (shape always varies)."""
    pools = {"color": list(COLORS)[:num_colors], "shape": list(SHAPES), "size": list(SIZES),
             "material": list(MATERIALS)}
    return {key: values for key, values in pools.items() if key in attributes or key == "shape"}


def random_scene(rng: random.Random, min_objects: int, max_objects: int, attributes: tuple = ATTRIBUTES,
                 num_colors: int = len(COLORS), grid: int = GRID) -> list[SceneObject]:
    """Objects in distinct grid cells, in reading order. Attributes not in ``attributes`` take
    their :data:`FIXED` value and are never named."""
    count = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], count)
    pools = attribute_pools(attributes, num_colors)
    shown = tuple(a for a in ATTRIBUTES if a in pools)

    def draw(key: str) -> str:
        return rng.choice(pools[key]) if key in pools else FIXED.get(key, "red")

    return [SceneObject(shape=draw("shape"), color=draw("color"), size=draw("size"), material=draw("material"),
                        row=r, col=c, shown=shown, grid=grid)
            for r, c in sorted(cells)]


def render_scene(objects: list[SceneObject], image_size: int, grid: int = GRID) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = image_size / (objects[0].grid if objects else grid)
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
    return [{k: v for k, v in asdict(o).items() if k not in ("shown", "grid")} for o in objects]
