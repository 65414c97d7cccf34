"""Visual tasks: images rendered here with Pillow, each with a question and a verifiable answer.

    visual_equation  read "37 + 45 = ?" and compute it           key: the equation ("37+45")
    visual_count     how many red circles (among distractors)     key: count|shape|colour|the
                                                                  distractors (a sorted multiset)
    visual_colour    the colour of the largest shape               key: the scene (the largest,
                                                                  then the others sorted)
    visual_word      read a short English or Chinese word          key: the word (difficulty 1) or
                     (difficulty 1) or phrase (2+)                 phrase ("red cat", "红苹果")

Held-out problem space (distinct test keys, about a tenth of each space): at difficulty 2 every
task has more than 200 (tests/test_vision_data.py counts them); at difficulty 1 the equation,
colour and word spaces are small (29, 4 and 9 keys), a warm-up, not an evaluation. Chance, for a
model that ignores the image: `CHANCE` (the best constant guess at difficulty 2).

Problems are `tasks.base.Problem`s, so the held-out split is the shared hash of the key: every
rendering of a held-out equation is held out, whatever the seed, size or language. The picture is a
function of (key, render seed) only: `task.render(problem, seed)` draws the same key differently
for different seeds (positions, sizes, distractors), identically for the same one. Prompts start
with one `<image>` placeholder (data/images.py expands it).

Photographs: behind a share of the count, colour and word pictures the scene is drawn over a real
photograph that an installed package ships (tasks/photos.py: the sources, their licences, the
crop), so that a model learns to read content off photographs, not only off white. The task option
`photo_share` is that share; by default 0 at difficulty 1 (the warm-up stays plain) and
`PHOTO_SHARE` (a quarter) from difficulty 2 on (a problem records its difficulty in its metadata).
Whether a picture has a photo, which one and its crop come from their own rng, seeded like the
picture's (task, key, render seed): plain pictures are byte for byte what they were before photos
existed, and the key and the split do not change. Over a photo, shapes get a black outline and text
a white halo; the photo is lightened so that no background pixel can match a drawn colour
(photos.py). `render_layout` returns, with the picture, what the renderer drew where (its ground
truth, for tests).

Fonts: Latin text uses matplotlib's bundled DejaVu Sans (always installed with nanoseek); Chinese
needs a CJK font, looked up among Debian's (`fonts-wqy-zenhei`, `make fonts` installs it) and
Noto CJK paths, else FontError says what to install.
"""

from __future__ import annotations

import random
import unicodedata
from functools import cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from nanoseek.tasks import photos
from nanoseek.tasks.arithmetic import SYMBOL, solve
from nanoseek.tasks.base import Problem, Task
from nanoseek.tasks.format import FORMAT_INSTRUCTIONS, parse_int

IMAGE = "<image>"
COLOURS = {  # name -> (RGB, Chinese name)
    "red": ((220, 30, 30), "红色"),
    "green": ((30, 160, 50), "绿色"),
    "blue": ((30, 70, 220), "蓝色"),
    "yellow": ((235, 200, 20), "黄色"),
    "purple": ((140, 40, 170), "紫色"),
    "orange": ((245, 130, 20), "橙色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
WORDS_EN = (
    "cat dog sun moon tree fish bird book milk rain snow star ship lamp door road "
    "king cake rice wind fire gold ring bell frog duck lion bear wolf desk shoe hat "
    "map box cup pen key egg apple river house green"
).split()
WORDS_ZH = (
    "太阳 月亮 大树 小鱼 飞鸟 书本 牛奶 下雨 雪花 星星 轮船 台灯 大门 马路 国王 蛋糕 "
    "米饭 大风 火车 黄金 戒指 铃铛 青蛙 鸭子 狮子 熊猫 老虎 桌子 鞋子 帽子 地图 箱子 "
    "茶杯 钢笔 钥匙 鸡蛋 苹果 河流 房子 花园"
).split()
# difficulty 2+: "adjective noun" phrases (Chinese: the modifier written before the noun)
ADJECTIVES_EN = (
    "red blue green big small old new hot cold warm dark soft fast slow tall short long happy "
    "sad wild tiny sweet quiet loud bright round wet dry young brave"
).split()
NOUNS_EN = (
    "cat dog sun moon tree fish bird book rain snow star ship lamp door road king cake wind "
    "fire ring bell frog duck lion bear wolf desk shoe hat map box cup pen key egg apple river "
    "house horse goat cow pig boat car bus train hill lake sea rock leaf rose seed coat bag ball "
    "drum kite"
).split()
ADJECTIVES_ZH = list("红绿蓝黄紫白黑大小老新长高短冷热甜美好快")
CHANCE = {  # the best answer without looking, at difficulty 2 (equations, words: open answers)
    "visual_equation": 0.0,
    "visual_count": 1 / 6,
    "visual_colour": 1 / 6,
    "visual_word": 0.0,
}
CJK_FONTS = (
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
)
BACKGROUND = (255, 255, 255)
PHOTO_SHARE = 0.25  # the default share of pictures drawn over a photo, from difficulty 2 on
OUTLINE = (0, 0, 0)  # around a shape drawn over a photo
HALO = (255, 255, 255)  # around text drawn over a photo


class FontError(RuntimeError):
    """No font that can draw the text; the message says what to install."""


@cache
def _font_file(cjk: bool) -> str:
    if cjk:
        for f in CJK_FONTS:
            if Path(f).is_file():
                return f
        raise FontError(
            "no CJK font found (looked for " + ", ".join(CJK_FONTS) + "); install Debian's "
            "fonts-wqy-zenhei (`apt-get install fonts-wqy-zenhei`, or `make fonts`)"
        )
    import matplotlib  # a dependency; it ships DejaVu Sans, the same file on every machine

    return str(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf")


def font(size: int, cjk: bool = False) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(_font_file(cjk), size)


def is_cjk(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def _canvas(size: tuple[int, int], photo: Image.Image | None) -> Image.Image:
    return photo.copy() if photo is not None else Image.new("RGB", size, BACKGROUND)


def _draw_text(
    text: str, size: tuple[int, int], rng: random.Random, photo: Image.Image | None = None
) -> tuple[Image.Image, list[dict]]:
    """Text centred (with a little jitter) on a white canvas (or the photo, with a white halo),
    in a dark random colour -> (picture, [{"text", "box", "ink"}])."""
    W, H = size
    img = _canvas(size, photo)
    draw = ImageDraw.Draw(img)
    f = font(max(8, int(H * rng.uniform(0.45, 0.6))), cjk=is_cjk(text))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    x = (W - (right - left)) / 2 - left + rng.uniform(-0.1, 0.1) * W
    y = (H - (bottom - top)) / 2 - top + rng.uniform(-0.1, 0.1) * H
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    halo = {} if photo is None else {"stroke_width": max(1, f.size // 12), "stroke_fill": HALO}
    draw.text((x, y), text, font=f, fill=ink, **halo)
    box = draw.textbbox((x, y), text, font=f)  # the letters' own box (the halo reaches beyond)
    return img, [{"text": text, "box": box, "ink": ink}]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, colour, outline=None) -> None:
    x0, y0, x1, y1 = box
    line = {} if outline is None else {"outline": outline, "width": 2}
    if shape == "circle":
        draw.ellipse(box, fill=colour, **line)
    elif shape == "square":
        draw.rectangle(box, fill=colour, **line)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour, **line)


def _draw_scene(
    items, size: tuple[int, int], rng: random.Random, photo: Image.Image | None = None
) -> tuple[Image.Image, list[dict]]:
    """items: [(shape, colour name, relative size 0..1)] (at most 9), each in its own cell of a
    1x1, 2x2 or 3x3 grid (the smallest that holds them; so shapes never overlap), jittered inside
    it; over a photo each gets a black outline -> (picture, [{"shape", "colour", "box"}])."""
    cells = next(c for c in (1, 2, 3) if len(items) <= c * c)
    W, H = size
    img = _canvas(size, photo)
    draw = ImageDraw.Draw(img)
    cw = W / cells
    ch = H / cells
    layout = []
    for (shape, colour, rel), cell in zip(items, rng.sample(range(cells * cells), len(items))):
        side = rel * min(cw, ch)
        cx = (cell % cells) * cw + rng.uniform(side / 2, cw - side / 2)
        cy = (cell // cells) * ch + rng.uniform(side / 2, ch - side / 2)
        box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
        _draw_shape(draw, shape, box, COLOURS[colour][0], None if photo is None else OUTLINE)
        layout.append({"shape": shape, "colour": colour, "box": box})
    return img, layout


class VisualTask(Task):
    """A task whose problems come with a picture: `render(problem, seed)`.

    photo_share: the share of pictures drawn over a photograph (tasks/photos.py), in [0, 1];
    None (the default): 0 at difficulty 1, PHOTO_SHARE from difficulty 2 on. A task without photo
    sources (visual_equation) draws none whatever it is given."""

    default_size: tuple[int, int] = (128, 128)

    def __init__(self, photo_share: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if photo_share is not None and not (
            isinstance(photo_share, (int, float)) and 0 <= photo_share <= 1
        ):
            raise ValueError(f"{self.name}: photo_share must be in [0, 1], got {photo_share!r}")
        self.photo_share = photo_share

    def share_of_photos(self, difficulty: int) -> float:
        if not photos.sources_for(self.name):
            return 0.0
        if self.photo_share is not None:
            return float(self.photo_share)
        return 0.0 if difficulty <= 1 else PHOTO_SHARE

    def render(
        self, problem: Problem, seed: int = 0, size: tuple[int, int] | None = None
    ) -> Image.Image:
        return self.render_layout(problem, seed, size)[0]

    def render_layout(
        self, problem: Problem, seed: int = 0, size: tuple[int, int] | None = None
    ) -> tuple[Image.Image, dict]:
        """(the picture, what was drawn: {"photo": a source name or None, "items": [the shapes
        with their boxes, or the text with its box and ink]})."""
        size = tuple(size or self.default_size)
        rng = random.Random(f"{self.name}|{problem.key}|{seed}")
        # the photo's own rng: the plain pictures' draws are untouched by it
        photo_rng = random.Random(f"{self.name}|{problem.key}|{seed}|photo")
        share = self.share_of_photos(problem.metadata.get("difficulty", 1))
        photo = None
        source = None
        if share and photo_rng.random() < share:
            photo, source = photos.background(self.name, size, photo_rng)
        img, items = self._render(problem, size, rng, photo)
        return img, {"photo": source, "items": items}

    def _render(
        self, problem: Problem, size, rng: random.Random, photo: Image.Image | None
    ) -> tuple[Image.Image, list[dict]]:
        raise NotImplementedError


class VisualEquation(VisualTask):
    name = "visual_equation"
    max_answer_chars = 40
    default_size = (192, 64)
    QUESTION = {
        "en": "Read the equation in the image and compute it.",
        "zh": "读出图中的算式并计算结果。",
    }

    def sample(self, rng: random.Random, difficulty: int, lang: str) -> Problem:
        op = rng.choice(("+", "-", "*"))
        a = rng.randint(0, 10**difficulty - 1)
        b = rng.randint(0, 10 ** max(1, (difficulty + 1) // 2 if op == "*" else difficulty) - 1)
        answer, steps = solve(a, op, b, lang)
        return self.problem(
            key=f"{a}{op}{b}",
            lang=lang,
            prompt=f"{IMAGE}\n{self.QUESTION[lang]} {FORMAT_INSTRUCTIONS[lang]}",
            answer=str(answer),
            reasoning=f"{a} {SYMBOL[op]} {b}\n{steps}\n= {answer}",
            a=a,
            b=b,
            op=op,
            difficulty=difficulty,
        )

    def _render(self, problem, size, rng, photo):
        m = problem.metadata
        return _draw_text(f"{m['a']} {SYMBOL[m['op']]} {m['b']} = ?", size, rng, photo)

    def score(self, problem, answer):
        value = parse_int(answer)
        if value is None:
            return 0.0, "not_an_integer"
        return (1.0, None) if value == int(problem.answer) else (0.0, "wrong")


class VisualCount(VisualTask):
    name = "visual_count"
    max_answer_chars = 20
    QUESTION = {
        "en": "How many {colour} {plural} are in the image?",
        "zh": "图中有几个{colour_zh}的{shape_zh}？",
    }

    def sample(self, rng: random.Random, difficulty: int, lang: str) -> Problem:
        n = rng.randint(1, min(6, 2 + 2 * difficulty))
        shape = rng.choice(list(SHAPES))
        colour = rng.choice(list(COLOURS))
        # the distractors are part of the problem (the scene), so they decide the split too
        others = [(s, c) for s in SHAPES for c in COLOURS if (s, c) != (shape, colour)]
        distractors = sorted(
            f"{c} {s}" for s, c in (rng.choice(others) for _ in range(rng.randint(0, 9 - n)))
        )
        question = self.QUESTION[lang].format(
            colour=colour,
            plural=PLURAL[shape],
            colour_zh=COLOURS[colour][1],
            shape_zh=SHAPES[shape],
        )
        what = f"{colour} {PLURAL[shape]}" if lang == "en" else COLOURS[colour][1] + SHAPES[shape]
        return self.problem(
            key=f"{n}|{shape}|{colour}|" + ",".join(distractors),
            lang=lang,
            prompt=f"{IMAGE}\n{question} {FORMAT_INSTRUCTIONS[lang]}",
            answer=str(n),
            reasoning=f"{what}: " + ", ".join(str(i) for i in range(1, n + 1)),
            n=n,
            shape=shape,
            colour=colour,
            distractors=distractors,
            difficulty=difficulty,
        )

    def _render(self, problem, size, rng, photo):
        m = problem.metadata
        items = [(m["shape"], m["colour"], rng.uniform(0.5, 0.8)) for _ in range(m["n"])]
        for d in m["distractors"]:
            colour, shape = d.split(" ")
            items.append((shape, colour, rng.uniform(0.5, 0.8)))
        return _draw_scene(items, size, rng, photo)

    def score(self, problem, answer):
        value = parse_int(answer)
        if value is None:
            return 0.0, "not_an_integer"
        return (1.0, None) if value == int(problem.answer) else (0.0, "wrong")


class VisualColour(VisualTask):
    name = "visual_colour"
    max_answer_chars = 20
    QUESTION = {
        "en": "What colour is the largest shape in the image?",
        "zh": "图中最大的图形是什么颜色？",
    }

    def sample(self, rng: random.Random, difficulty: int, lang: str) -> Problem:
        # difficulty 1: one shape; d: up to 2d - 1. colours[0] is the largest shape's; the others
        # have any other colour (repeats allowed), listed sorted: the key is the scene, not an order
        k = rng.randint(1, min(9, 2 * difficulty - 1))
        first = rng.choice(list(COLOURS))
        rest = sorted(
            (rng.choice([c for c in COLOURS if c != first]), rng.choice(list(SHAPES)))
            for _ in range(k - 1)
        )
        colours = [first] + [c for c, _ in rest]
        shapes = [rng.choice(list(SHAPES))] + [s for _, s in rest]
        answer = colours[0] if lang == "en" else COLOURS[colours[0]][1]
        scene = ",".join(f"{c} {s}" for c, s in zip(colours, shapes))
        return self.problem(
            key=scene,
            lang=lang,
            prompt=f"{IMAGE}\n{self.QUESTION[lang]} {FORMAT_INSTRUCTIONS[lang]}",
            answer=answer,
            reasoning=f"{scene.split(',')[0]}",
            colours=colours,
            shapes=shapes,
            difficulty=difficulty,
        )

    def _render(self, problem, size, rng, photo):
        m = problem.metadata
        # the largest fills 90-100% of its cell's side, the others at most 45%: even a largest
        # triangle (half its box) has twice the area of the biggest other square
        items = [(m["shapes"][0], m["colours"][0], rng.uniform(0.9, 1.0))]
        items += [(s, c, rng.uniform(0.3, 0.45)) for s, c in zip(m["shapes"][1:], m["colours"][1:])]
        return _draw_scene(items, size, rng, photo)

    def score(self, problem, answer):
        said = unicodedata.normalize("NFKC", answer).strip().casefold().removesuffix(".")
        truth = problem.metadata["colours"][0]
        names = {truth, COLOURS[truth][1], COLOURS[truth][1].removesuffix("色")}
        return (1.0, None) if said in names else (0.0, "wrong")


class VisualWord(VisualTask):
    name = "visual_word"
    max_answer_chars = 40
    default_size = (160, 64)
    QUESTION = {"en": "What word is written in the image?", "zh": "图中写的是什么词？"}

    def sample(self, rng: random.Random, difficulty: int, lang: str) -> Problem:
        if difficulty == 1:
            word = rng.choice(WORDS_EN + WORDS_ZH)
        elif rng.random() < len(ADJECTIVES_EN) * len(NOUNS_EN) / (
            len(ADJECTIVES_EN) * len(NOUNS_EN) + len(ADJECTIVES_ZH) * len(WORDS_ZH)
        ):  # uniform over all phrases
            word = f"{rng.choice(ADJECTIVES_EN)} {rng.choice(NOUNS_EN)}"
        else:
            word = rng.choice(ADJECTIVES_ZH) + rng.choice(WORDS_ZH)
        return self.problem(
            key=word,
            lang=lang,
            prompt=f"{IMAGE}\n{self.QUESTION[lang]} {FORMAT_INSTRUCTIONS[lang]}",
            answer=word,
            reasoning=" ".join(word),
            word=word,
            difficulty=difficulty,
        )

    def _render(self, problem, size, rng, photo):
        return _draw_text(problem.metadata["word"], size, rng, photo)

    def score(self, problem, answer):
        said = unicodedata.normalize("NFKC", answer).strip().casefold()
        return (1.0, None) if said == problem.answer.casefold() else (0.0, "wrong")


VISUAL_TASKS: dict[str, type[VisualTask]] = {
    t.name: t for t in (VisualEquation, VisualCount, VisualColour, VisualWord)
}


def get_visual_task(name: str, **kwargs) -> VisualTask:
    if name not in VISUAL_TASKS:
        raise KeyError(f"unknown visual task {name!r}; known: {sorted(VISUAL_TASKS)}")
    return VISUAL_TASKS[name](**kwargs)
