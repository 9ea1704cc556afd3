import numpy as np
from PIL import Image

from featherflux.demo import evaluate, scenes
from featherflux.demo.tokenizer import build_tokenizer
from featherflux.model.config import get_family


def test_render_is_deterministic_and_seed_dependent():
    scene = scenes.Scene("star", "red", "blue", "on the left")
    a, b, c = scenes.render(scene, 3), scenes.render(scene, 3), scenes.render(scene, 4)
    assert a.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_captions_follow_the_fixed_layout():
    assert scenes.Scene("star", "red", "blue").caption == "a red star on a blue background"
    assert scenes.Scene("circle", "orange", "white", "at the top").caption == (
        "an orange circle on a white background, at the top"
    )


def test_split_is_disjoint_covers_every_caption_and_excludes_the_novel_color():
    train, heldout = scenes.split("train"), scenes.split("heldout")
    assert not {s.caption for s in train} & {s.caption for s in heldout}
    assert len(train) + len(heldout) == len(scenes.all_scenes())
    assert len(heldout) >= 200  # eval-demo --n 200 uses distinct captions
    assert all(scenes.NOVEL_COLOR not in (s.color, s.background) for s in train + heldout)
    novel = scenes.split("heldout", (scenes.NOVEL_COLOR,))
    assert novel and all(s.color == scenes.NOVEL_COLOR for s in novel)


def test_tokenizer_keeps_every_caption_word_whole_and_within_the_text_length():
    tokenizer = build_tokenizer()
    family = get_family("demo")
    assert len(tokenizer) <= family.text_encoder.vocab_size
    longest = max((s.caption for s in scenes.all_scenes(tuple(scenes.COLORS))), key=len)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": longest}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    tokens = tokenizer.tokenize(text)
    assert len(tokens) <= family.text_encoder.max_length
    assert [t.lstrip("Ġ") for t in tokens[:-1] if t != ","] == longest.replace(",", "").split()


def test_evaluator_reads_reference_drawings_correctly():
    prompts = evaluate.heldout_prompts(60) + scenes.split("heldout", (scenes.NOVEL_COLOR,))[:20]
    report = evaluate.score([scenes.render(s, i) for i, s in enumerate(prompts)], prompts)
    assert report.adherence == 1.0, report.failures[:5]


def test_evaluator_rejects_pictures_that_contradict_the_caption():
    prompts = evaluate.heldout_prompts(40)
    shapes = {"circle": "star", "star": "square", "square": "triangle", "triangle": "circle"}
    wrong_shape = [scenes.Scene(shapes[s.shape], s.color, s.background, s.position) for s in prompts]
    report = evaluate.score([scenes.render(s, 0) for s in wrong_shape], prompts)
    assert report.shape == 0.0 and report.color == 1.0 and report.adherence == 0.0
    other_side = {"on the left": "on the right"}
    moved = [scenes.Scene(s.shape, s.color, s.background, other_side.get(s.position, "on the left"))
             for s in prompts if s.position]
    report = evaluate.score([scenes.render(s, 0) for s in moved], [p for p in prompts if p.position])
    assert report.position == 0.0


def test_blank_picture_has_no_shape():
    reading = evaluate.read_image(Image.new("RGB", (64, 64), scenes.COLORS["green"]))
    assert reading.shape is None and reading.background == "green"
