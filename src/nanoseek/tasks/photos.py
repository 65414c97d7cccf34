"""Real photographs behind the visual tasks' scenes: images that installed packages ship, with their
licences, and a deterministic crop of one as a picture's background.

Sources (each one's file is read from the installed package, never downloaded):

    grace_hopper     matplotlib's mpl-data/sample_data/grace_hopper.jpg: a US Navy photograph of
                     Rear Admiral Grace Hopper, a work of the US federal government, so public
                     domain (the JPEG's comment names its source, Wikimedia Commons'
                     File:Grace_Hopper.jpg). visual_count, visual_colour, visual_word.
    matplotlib_logo  matplotlib's mpl-data/sample_data/logo2.png, the Matplotlib Development
                     Team's own logo, under matplotlib's licence (its dist-info LICENSE).
                     visual_count and visual_colour only: its lettering would be a second word in
                     a visual_word picture.

matplotlib's sample_data also has Minduka_Present_Blue_Pack.png; neither sample_data/README.txt
nor matplotlib's LICENSE names its licence, so it is not used.

A background is the photo cropped at a random place and scale to the picture's aspect ratio,
scaled to its size, mirrored or not, and lightened towards white by a random 55-80%: every channel
of every background pixel is then at least 140, while each colour a task draws has a channel of 70
or less (tasks/visual.py COLOURS, the text's ink), so a drawn shape or letter can never blend into
the photo. The crop is a function of the rng it is given (tasks/visual.py seeds it from the task,
the problem's key and the render seed), and of the photo's bytes, which `photo_manifest` records
(sha256) with the package's version and the licence.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image, ImageOps

LIGHTEN = (0.55, 0.8)  # the share of white mixed into a background
MIN_BACKGROUND = int(255 * LIGHTEN[0])  # 140: the darkest any background channel gets


class PhotoError(RuntimeError):
    """A photo source's file is missing; the message says which package to install."""


@dataclass(frozen=True)
class PhotoSource:
    name: str
    package: str  # the PyPI distribution that ships the file; its version goes into the manifest
    module: str  # its import name (found without importing it)
    path: str  # the file, relative to the module's directory
    license: str
    attribution: str
    tasks: tuple[str, ...]  # the visual tasks that may draw over it


PHOTOS = (
    PhotoSource(
        name="grace_hopper",
        package="matplotlib",
        module="matplotlib",
        path="mpl-data/sample_data/grace_hopper.jpg",
        license="public domain (a US Navy photograph: a work of the US federal government)",
        attribution="Rear Admiral Grace M. Hopper, US Navy photograph, via Wikimedia Commons "
        "(File:Grace_Hopper.jpg, as the file's JPEG comment says); shipped in matplotlib's "
        "sample data",
        tasks=("visual_count", "visual_colour", "visual_word"),
    ),
    PhotoSource(
        name="matplotlib_logo",
        package="matplotlib",
        module="matplotlib",
        path="mpl-data/sample_data/logo2.png",
        license="matplotlib license (Matplotlib Development Team; PSF-style, see matplotlib's "
        "LICENSE)",
        attribution="the matplotlib logo, Copyright (c) 2012- Matplotlib Development Team; All "
        "Rights Reserved; used cropped, scaled, mirrored and lightened",
        tasks=("visual_count", "visual_colour"),
    ),
)


def sources_for(task: str) -> tuple[PhotoSource, ...]:
    return tuple(s for s in PHOTOS if task in s.tasks)


def photo_path(source: PhotoSource) -> Path:
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise PhotoError(f"photo {source.name}: package {source.package} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / source.path
    if not path.is_file():
        raise PhotoError(
            f"photo {source.name}: {path} is missing from the installed {source.package} "
            f"(reinstall it: pip install --force-reinstall {source.package})"
        )
    return path


@cache
def load_photo(name: str) -> Image.Image:
    """A source's photo, decoded once per process (RGB, transparency flattened onto white)."""
    from nanoseek.data.images import load_image

    source = next(s for s in PHOTOS if s.name == name)
    return load_image(photo_path(source))


def background(task: str, size: tuple[int, int], rng: random.Random) -> tuple[Image.Image, str]:
    """(a lightened crop of one of the task's photos, `size` (w, h), drawn from `rng` alone; the
    source's name)."""
    source = rng.choice(sources_for(task))
    photo = load_photo(source.name)
    W, H = size
    pw, ph = photo.size
    # the largest crop of the picture's aspect ratio that fits, then 40-100% of it
    scale = min(pw / W, ph / H) * rng.uniform(0.4, 1.0)
    cw = max(1, min(pw, round(W * scale)))
    ch = max(1, min(ph, round(H * scale)))
    x = rng.randint(0, pw - cw)
    y = rng.randint(0, ph - ch)
    crop = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        crop = ImageOps.mirror(crop)
    white = Image.new("RGB", size, (255, 255, 255))
    return Image.blend(crop, white, rng.uniform(*LIGHTEN)), source.name


def photo_manifest(tasks=None) -> list[dict]:
    """Each photo source the given visual tasks (default: all) may draw over: its file, package
    and version, sha256, size, licence, attribution and tasks."""
    rows = []
    for s in PHOTOS:
        if tasks is not None and not set(s.tasks) & set(tasks):
            continue
        path = photo_path(s)
        try:
            version = importlib.metadata.version(s.package)
        except importlib.metadata.PackageNotFoundError:
            version = None
        with Image.open(path) as img:
            width, height = img.size
        rows.append(
            {
                "name": s.name,
                "package": s.package,
                "version": version,
                "file": s.path,
                "path": str(path),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "size": [width, height],
                "license": s.license,
                "attribution": s.attribution,
                "tasks": list(s.tasks),
            }
        )
    return rows
