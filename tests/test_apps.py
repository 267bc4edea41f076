"""Built-in apps: paint draws where the mouse went and persists; probe codes are readable; loading."""

from __future__ import annotations

import logging
import sys
import textwrap

import numpy as np
import pytest

from cloudq.probe import probe_rows, read_probe
from cloudq.wire import InputEvent
from cloudq.workers.apps import App, PaintApp, ProbeApp, load_app
from cloudq.workers.apps.paint import PALETTE

W, H = 320, 240
WHITE = np.array([255, 255, 255], np.uint8)


def mouse(kind: str, x: int, y: int, seq: int = 1) -> InputEvent:
    return InputEvent(kind, seq=seq, client_time=0.0, x=x, y=y, button=0)


def key(k: str, seq: int = 1) -> InputEvent:
    return InputEvent("key", seq=seq, client_time=0.0, key=k)


def drag(app: App, *points: tuple[int, int]) -> None:
    app.handle_input(mouse("mouse_down", *points[0]))
    for p in points[1:-1]:
        app.handle_input(mouse("mouse_move", *p))
    app.handle_input(mouse("mouse_up", *points[-1]))


def painted(frame: np.ndarray) -> np.ndarray:
    return (frame != WHITE).any(axis=2)


def test_paint_draws_along_the_mouse_path_only():
    app = PaintApp(W, H, brush=3)
    drag(app, (20, 50), (100, 50), (100, 150))
    frame = app.render(0.0)
    ink = painted(frame)
    assert ink[50, 20] and ink[50, 60] and ink[50, 100] and ink[100, 100] and ink[150, 100]
    assert (frame[50, 60] == PALETTE[0]).all()
    assert not ink[10, 10] and not ink[200, 300] and not ink[100, 60]
    ys, xs = np.nonzero(ink)
    assert xs.min() >= 20 - 3 and xs.max() <= 100 + 3 and ys.min() >= 50 - 3 and ys.max() <= 150 + 3


def test_mouse_move_without_button_down_draws_nothing():
    app = PaintApp(W, H)
    app.render(0.0)
    app.handle_input(mouse("mouse_move", 50, 50))
    assert not app.changed()
    assert not painted(app.render(0.0)).any()


def test_keys_pick_colour_and_brush_size():
    app = PaintApp(W, H, brush=2)
    app.handle_input(key("2"))
    assert app.colour == PALETTE[1]
    app.handle_input(key("c"))
    assert app.colour == PALETTE[2]
    for _ in range(4):
        app.handle_input(key("+"))
    app.handle_input(key("-"))
    assert app.brush == 5
    drag(app, (160, 120), (160, 120))
    frame = app.render(0.0)
    assert (frame[120, 160] == PALETTE[2]).all()
    assert painted(frame)[120, 165] and not painted(frame)[120, 166]
    app.handle_input(key("Delete"))
    assert app.changed() and not painted(app.render(0.0)).any()


def test_paint_takes_a_browsers_key_down_with_x_keysym_names():
    app = PaintApp(W, H, brush=2)
    app.handle_input(InputEvent("key_down", 1, 0.0, key="3"))
    app.handle_input(InputEvent("key_up", 2, 0.0, key="3"))
    assert app.colour == PALETTE[2]
    app.handle_input(InputEvent("key_down", 3, 0.0, key="plus"))
    app.handle_input(InputEvent("key_down", 4, 0.0, key="equal"))
    app.handle_input(InputEvent("key_down", 5, 0.0, key="minus"))
    assert app.brush == 3
    app.handle_input(InputEvent("key_up", 6, 0.0, key="plus"))  # a release does nothing
    assert app.brush == 3


def test_strokes_off_the_canvas_are_clipped():
    app = PaintApp(W, H)
    drag(app, (-1000, -1000), (-(2**31), 2**31 - 1))
    drag(app, (-5, 120), (5, 120))
    assert painted(app.render(0.0))[120, 0]


def test_changed_is_false_when_idle_and_true_after_drawing():
    app = PaintApp(W, H)
    assert app.changed()  # nothing shown yet
    app.render(0.0)
    assert not app.changed()
    app.render(0.1)
    assert not app.changed()
    drag(app, (10, 10), (30, 30))
    assert app.changed()
    app.render(0.2)
    assert not app.changed()


def test_paint_damage_holds_every_pixel_a_render_changed_and_nothing_more_than_the_strokes():
    """damage() after a render bounds what changed since the render before: the whole picture
    first, after a clear and after a load; an empty box while idle; the strokes' box otherwise."""
    app = PaintApp(W, H)
    before = app.render(0.0)
    assert app.damage() is None  # the first picture: all of it
    app.render(0.1)
    x0, y0, x1, y1 = app.damage()
    assert x1 <= x0 or y1 <= y0  # nothing changed
    for stroke in (((10, 10), (30, 30)), ((200, 5), (210, 12)), ((100, 200), (100, 200))):
        drag(app, *stroke)
        after = app.render(0.2)
        x0, y0, x1, y1 = app.damage()
        changed = (after != before).any(axis=2)
        assert changed.any()
        outside = changed.copy()
        outside[y0:y1, x0:x1] = False
        assert not outside.any(), f"{stroke}: pixels changed outside the damage {x0, y0, x1, y1}"
        assert (x1 - x0) * (y1 - y0) < W * H / 10
        before = after
    app.handle_input(key("Delete"))
    app.render(0.3)
    assert app.damage() is None


def test_render_returns_a_copy_the_caller_owns():
    app = PaintApp(W, H)
    frame = app.render(0.0)
    drag(app, (10, 10), (30, 30))
    assert not painted(frame).any()


def test_paint_canvas_survives_save_and_load(tmp_path):
    app = PaintApp(W, H)
    app.handle_input(key("4"))
    drag(app, (30, 40), (200, 180))
    before = app.render(0.0)
    app.save(tmp_path / "user")
    assert (tmp_path / "user" / "canvas.npy").exists()
    assert not list((tmp_path / "user").glob("*.tmp"))

    fresh = PaintApp(W, H)
    fresh.load(tmp_path / "user")
    assert fresh.changed()
    assert np.array_equal(fresh.render(0.0), before)


def test_paint_load_starts_blank_without_a_file(tmp_path):
    app = PaintApp(W, H)
    app.load(tmp_path)
    assert not painted(app.render(0.0)).any()


def test_paint_load_refuses_a_wrong_shaped_or_corrupt_file(tmp_path, caplog):
    np.save(tmp_path / "canvas.npy", np.zeros((10, 10, 3), np.uint8))
    app = PaintApp(W, H)
    with caplog.at_level(logging.WARNING, logger="cloudq.workers.apps"):
        app.load(tmp_path)
    assert "starting blank" in caplog.text
    assert not painted(app.render(0.0)).any()

    (tmp_path / "canvas.npy").write_bytes(b"not a numpy file")
    app.load(tmp_path)
    assert app.render(0.0).shape == (H, W, 3)

    np.save(tmp_path / "canvas.npy", np.array([object()]), allow_pickle=True)
    app.load(tmp_path)  # pickles are never loaded
    assert not painted(app.render(0.0)).any()


def test_probe_codes_last_input_seq_and_frame_counter():
    app = ProbeApp(W, H)
    assert read_probe(app.render(0.0)) == (0, 0)
    app.handle_input(key("x", seq=2**32 - 1))
    assert read_probe(app.render(0.0)) == (2**32 - 1, 1)
    assert app.changed()


@pytest.mark.parametrize(("width", "height"), [(160, 128), (320, 240), (640, 480), (1280, 720), (1920, 1080)])
def test_probe_fits_common_sizes(width, height):
    app = ProbeApp(width, height)
    app.counter = 987654
    app.handle_input(key("a", seq=31337))
    assert read_probe(app.render(0.0)) == (31337, 987654)
    assert probe_rows(width) * 16 <= height


def test_read_probe_refuses_frames_without_a_code():
    with pytest.raises(ValueError, match="marker"):
        read_probe(np.zeros((H, W, 3), np.uint8))
    frame = ProbeApp(W, H).render(0.0)
    frame[:16, 16 * 12 : 16 * 13] = 255 - frame[:16, 16 * 12 : 16 * 13]  # flip one seq bit
    with pytest.raises(ValueError, match="check byte"):
        read_probe(frame)


def test_probe_refuses_frames_too_small():
    with pytest.raises(ValueError):
        ProbeApp(64, 32)


def test_load_app_builds_builtins():
    assert isinstance(load_app("paint", W, H), PaintApp)
    probe = load_app(" probe ", W, H)
    assert isinstance(probe, ProbeApp) and (probe.width, probe.height) == (W, H)


def test_load_app_imports_third_party_classes(tmp_path, monkeypatch):
    (tmp_path / "thirdparty_app.py").write_text(
        textwrap.dedent(
            """
            import numpy as np
            from cloudq.workers.apps import App

            class Solid(App):
                def render(self, t):
                    return np.zeros((self.height, self.width, 3), np.uint8)

                def handle_input(self, ev):
                    pass

            class Broken:
                def __init__(self, width, height):
                    self.width, self.height = width, height

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "thirdparty_app", raising=False)
    app = load_app("thirdparty_app:Solid", W, H)
    assert app.render(0.0).shape == (H, W, 3)
    with pytest.raises(ValueError, match="lacks"):
        load_app("thirdparty_app:Broken", W, H)
    with pytest.raises(ValueError, match="not a class"):
        load_app("thirdparty_app:NOT_CALLABLE", W, H)
    with pytest.raises(ValueError, match="no attribute"):
        load_app("thirdparty_app:Missing", W, H)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "empty"),
        ("tetris", "unknown app"),
        ("no_such_module_xyz:App", "cannot import"),
        (":App", "bad app spec"),
        ("os.path:", "bad app spec"),
    ],
)
def test_load_app_errors_are_clear(spec, match):
    with pytest.raises(ValueError, match=match):
        load_app(spec, W, H)
