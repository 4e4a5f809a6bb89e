"""eval.py's scoring: prompt suites, per-video hits against measure, and the summary."""

import pytest

import eval as evaluation
from data import shapes


def test_real_clips_of_every_direction_prompt_score_full_marks():
    suite = evaluation.prompt_suite("directions", shapes.ShapesConfig())
    assert len(suite) == len(shapes.all_combinations()) * len(shapes.DIRECTIONS)
    wants = [want for _, want in suite]
    videos = shapes.render_batch([w["colour"] for w in wants], [w["shape"] for w in wants],
                                 [w["size"] for w in wants], [w["direction"] for w in wants],
                                 seeds=list(range(len(wants))))
    rows = [{"held_out": w["held_out"], "hits": evaluation.score(m, w)}
            for w, m in zip(wants, shapes.measure(videos))]
    summary = evaluation.summarize(rows)
    assert summary["all"] == {k: 1.0 for k in ("colour", "direction", "moving", "shape", "size")}
    assert summary["held_out"] and summary["seen"]


def test_a_static_clip_is_not_moving_and_a_wrong_colour_is_a_miss():
    (prompt, want), = [p for p in evaluation.prompt_suite("demo", shapes.ShapesConfig())
                       if p[0] == "a big red circle"]
    static = shapes.render("blue", "circle", "big", "static")
    hits = evaluation.score(shapes.measure(static), want)
    assert hits == {"colour": 0.0, "shape": 1.0, "size": 1.0, "moving": 0.0}


def test_summary_separates_held_out_prompts():
    rows = [{"held_out": True, "hits": {"colour": 1.0}},
            {"held_out": False, "hits": {"colour": 0.0}}]
    s = evaluation.summarize(rows)
    assert s["held_out"]["colour"] == 1.0 and s["seen"]["colour"] == 0.0
    assert s["all"]["colour"] == pytest.approx(0.5)


def test_demo_suite_marks_the_held_out_blue_circle():
    suite = dict(evaluation.prompt_suite("demo", shapes.ShapesConfig()))
    assert suite["a big blue circle"]["held_out"] and not suite["a big red circle"]["held_out"]
