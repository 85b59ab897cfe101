"""Figures: files that open, one shared color scale, log levels, NaN gaps, CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.contour import ContourSet

from sharpscope import plots
from sharpscope.cli import main
from sharpscope.errors import SharpscopeError
from sharpscope.surface import Surface


def bowl(scale: float, nx: int = 9, ny: int = 7, offset: float = 0.01) -> Surface:
    """A 2-D surface offset + scale (a^2 + b^2) on [-1, 1]^2, rows = b, columns = a."""
    a, b = np.linspace(-1, 1, nx), np.linspace(-1, 1, ny)
    loss = offset + scale * (a[None, :] ** 2 + b[:, None] ** 2)
    settings = {"kind": "2d", "split": "train", "directions": "filter", "label": f"s={scale}"}
    return Surface("2d", a, b, loss, np.exp(-loss), settings)


def curve(scale: float, n: int = 11, kind: str = "1d") -> Surface:
    a = np.linspace(-1, 1, n) if kind == "1d" else np.linspace(-0.5, 1.5, n)
    loss = 0.01 + scale * a**2
    settings = {"kind": kind, "split": "train", "directions": "filter", "label": f"s={scale}"}
    return Surface(kind, a, None, loss, np.exp(-loss), settings)


@pytest.fixture
def captured(monkeypatch):
    """The figures plot functions would save, kept open for inspection."""
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, out: figures.append(fig))
    return figures


def assert_png_drawn(path) -> None:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    # Not blank: many distinct colors, not one background color.
    rgb = image[..., :3].reshape(-1, 3)
    assert len(np.unique(np.round(rgb * 255), axis=0)) > 50
    assert (rgb.std(axis=0) > 0.05).all()


# -- color scale ---------------------------------------------------------------------
def test_shared_color_scale_covers_every_panel():
    low, high = np.array([[0.5, 1.0], [2.0, 3.0]]), np.array([[1.5, 4.0], [7.0, 9.0]])
    scale = plots.shared_color_scale([low, high], log=False)
    assert scale.levels[0] <= 0.5 and scale.levels[-1] >= 9.0
    assert not scale.log
    # Either panel alone would get a narrower scale: the shared one is not one of them.
    assert plots.shared_color_scale([low], log=False).levels[-1] < 9.0
    assert plots.shared_color_scale([high], log=False).levels[0] > 0.5
    steps = np.diff(scale.levels)
    np.testing.assert_allclose(steps, steps[0])  # linear: equal steps


def test_levels_are_log_spaced_when_the_range_spans_decades():
    scale = plots.shared_color_scale([np.array([1e-3, 0.1]), np.array([2.0, 10.0])])
    assert scale.log
    assert scale.levels[0] == pytest.approx(1e-3) and scale.levels[-1] == pytest.approx(10.0)
    levels = np.asarray(scale.levels)
    ratios = levels[1:] / levels[:-1]
    np.testing.assert_allclose(ratios, ratios[0])  # geometric: equal ratios
    # Less than two decades (ratio 50 < 100): linear.
    assert not plots.shared_color_scale([np.array([0.1, 5.0])]).log
    # A value <= 0 rules out a log scale unless forced; forced, it starts at the least
    # positive value.
    assert not plots.shared_color_scale([np.array([0.0, 1e-3, 10.0])]).log
    forced = plots.shared_color_scale([np.array([0.0, 1e-3, 10.0])], log=True)
    assert forced.log and forced.levels[0] == pytest.approx(1e-3)


def test_color_scale_ignores_nan_and_refuses_all_nan():
    scale = plots.shared_color_scale([np.array([np.nan, 1.0, 2.0])], log=False)
    assert np.isfinite(scale.levels).all()
    assert scale.vmin == 1.0 and scale.vmax == 2.0
    with pytest.raises(SharpscopeError, match="NaN"):
        plots.shared_color_scale([np.full(3, np.nan)])
    with pytest.raises(SharpscopeError, match="positive"):
        plots.shared_color_scale([np.array([-1.0, 0.0])], log=True)


def test_vmax_caps_the_scale():
    scale = plots.shared_color_scale([np.array([0.0, 1.0, 50.0])], vmax=10.0, log=False)
    assert 10.0 <= scale.levels[-1] < 50.0


# -- 2-D figures ---------------------------------------------------------------------
def test_side_by_side_panels_share_levels_norm_and_one_colorbar(captured, tmp_path):
    sharp, flat = bowl(8.0), bowl(1.0)
    scale = plots.plot_2d([sharp, flat], tmp_path / "f.png")
    assert scale == plots.shared_color_scale([sharp.loss, flat.loss])
    (fig,) = captured
    filled = [
        c for ax in fig.axes for c in ax.collections if isinstance(c, ContourSet) and c.filled
    ]
    assert len(filled) == 2
    for cs in filled:
        np.testing.assert_array_equal(cs.levels, scale.levels)
        assert (cs.norm.vmin, cs.norm.vmax) == (scale.levels[0], scale.levels[-1])
    colorbars = [ax for ax in fig.axes if ax.get_ylabel() == "train loss"]
    assert len(colorbars) == 1


def test_nan_points_stay_gaps_not_zeros(captured, tmp_path):
    surface = bowl(2.0)
    surface.loss[2:4, 5:] = np.nan  # an interrupted grid
    plots.plot_2d([surface], tmp_path / "f.png", style="heatmap")
    (fig,) = captured
    (mesh,) = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
    shown = np.ma.masked_invalid(mesh.get_array()).reshape(surface.loss.shape)
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), np.isnan(surface.loss))
    finite = ~np.isnan(surface.loss)
    np.testing.assert_allclose(shown[finite], surface.loss[finite])
    c = curve(1.0)
    c.loss[3] = np.nan
    plots.plot_1d([c], tmp_path / "c.png")
    line = captured[1].axes[0].lines[0]
    assert np.isnan(line.get_ydata()[3])


@pytest.mark.parametrize("style", plots.STYLES)
def test_2d_styles_render_png_that_opens(tmp_path, style):
    surfaces = [bowl(8.0, 21, 21, offset=1e-3), bowl(1.0, 21, 21, offset=1e-3)]
    surfaces[1].loss[15:, 15:] = np.nan
    surfaces[0].trajectory = np.array([[0.8, 0.5], [0.3, 0.2], [0.0, 0.0]])
    out = tmp_path / f"{style}.png"
    plots.plot_2d(surfaces, out, style=style, title="test")
    assert_png_drawn(out)


def test_png_is_print_resolution_at_column_widths(tmp_path):
    for columns in (1, 2):
        out = tmp_path / f"c{columns}.png"
        plots.plot_1d([curve(1.0)], out, columns=columns)
        width_px = matplotlib.image.imread(out).shape[1]
        width_in = plots.COLUMN_WIDTH_IN[columns]
        # bbox="tight" trims the margins: within 10% of the column width at 300 dpi.
        assert 0.9 * width_in * plots.PNG_DPI <= width_px <= 1.02 * width_in * plots.PNG_DPI


def test_vector_formats_by_extension(tmp_path):
    plots.plot_2d([bowl(1.0)], tmp_path / "f.pdf")
    plots.plot_1d([curve(1.0), curve(2.0)], tmp_path / "c.svg", log=True)
    assert (tmp_path / "f.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in (tmp_path / "c.svg").read_bytes()[:1000]
    assert sorted(os.listdir(tmp_path)) == ["c.svg", "f.pdf"]  # no temp files left


def test_interpolation_plot_marks_named_endpoints(captured, tmp_path):
    plots.plot_1d([curve(1.0, kind="interpolation")], tmp_path / "i.png", endpoints=("SGD", "SAM"))
    (fig,) = captured
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["SGD", "SAM"]
    assert fig.axes[-1].get_xlabel() == "t  (interpolation: 0 = SGD, 1 = SAM)"


def test_axis_labels_say_what_the_axes_are():
    assert plots.axis_label({"directions": "filter"}, 1) == "α  (filter-normalized direction 1)"
    assert plots.axis_label({"directions": "layer"}, 2) == "β  (layer-normalized direction 2)"
    assert "Hessian eigenvector 1" in plots.axis_label({"directions": "hessian"}, 1)
    assert "principal component 2" in plots.axis_label({"directions": "pca"}, 2)


def test_bad_plot_input_is_refused(tmp_path):
    with pytest.raises(SharpscopeError, match="format"):
        plots.plot_1d([curve(1.0)], tmp_path / "f.jpg")
    with pytest.raises(SharpscopeError, match="does not exist"):
        plots.plot_1d([curve(1.0)], tmp_path / "missing" / "f.png")
    with pytest.raises(SharpscopeError, match="overlay"):
        plots.plot_1d([curve(1.0), curve(1.0, kind="interpolation")], tmp_path / "f.png")
    with pytest.raises(SharpscopeError, match="2-D plot"):
        plots.plot_2d([curve(1.0)], tmp_path / "f.png")
    with pytest.raises(SharpscopeError, match="one label per surface"):
        plots.plot_2d([bowl(1.0), bowl(2.0)], tmp_path / "f.png", labels=["only one"])
    with pytest.raises(SharpscopeError, match="style"):
        plots.plot_2d([bowl(1.0)], tmp_path / "f.png", style="wireframe")
    assert os.listdir(tmp_path) == []


# -- CLI -----------------------------------------------------------------------------
def test_plotting_leaves_a_users_matplotlib_backend_alone(tmp_path):
    # A notebook user's `import sharpscope` and plot calls must not switch the
    # backend (inline, widget) nor go through pyplot's figure manager.
    script = (
        "import sys, matplotlib; matplotlib.use('svg'); import numpy as np; "
        "import sharpscope as ss; "
        "s = ss.Surface('1d', np.linspace(-1, 1, 5), None, np.arange(5.0), None, {}); "
        f"ss.plot_1d([s], {str(tmp_path / 'c.png')!r}); "
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert_png_drawn(tmp_path / "c.png")


def test_plot_command_writes_figures(tmp_path, capsys):
    bowl(8.0).save(str(tmp_path / "a.npz"))
    bowl(1.0).save(str(tmp_path / "b.npz"))
    curve(1.0).save(str(tmp_path / "c.npz"))
    args = [str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--labels", "SGD", "SAM"]
    assert main(["plot", *args, "--out", str(tmp_path / "two.png")]) == 0
    assert_png_drawn(tmp_path / "two.png")
    assert main(["plot", *args, "--style", "surface3d", "--out", str(tmp_path / "s.pdf")]) == 0
    assert (tmp_path / "s.pdf").read_bytes().startswith(b"%PDF")
    assert main(["plot", str(tmp_path / "c.npz"), "--log", "--out", str(tmp_path / "c.png")]) == 0
    assert_png_drawn(tmp_path / "c.png")


@pytest.mark.parametrize(
    "case, message",
    [
        ("unreadable", "not a sharpscope landscape"),
        ("mixed", "cannot mix 2-D"),
        ("missing-folder", "does not exist"),
        ("extension", "unknown figure format"),
        ("labels", "--labels"),
    ],
)
def test_plot_command_bad_input_exits_2(tmp_path, capsys, case, message):
    bowl(1.0).save(str(tmp_path / "a.npz"))
    curve(1.0).save(str(tmp_path / "c.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    files = {
        "unreadable": ["junk.npz"],
        "mixed": ["a.npz", "c.npz"],
        "missing-folder": ["a.npz"],
        "extension": ["a.npz"],
        "labels": ["a.npz"],
    }[case]
    out = {"missing-folder": "nowhere/f.png", "extension": "f.jpg"}.get(case, "f.png")
    argv = ["plot", *(str(tmp_path / f) for f in files), "--out", str(tmp_path / out)]
    if case == "labels":
        argv += ["--labels", "x", "y"]
    before = sorted(os.listdir(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temp file left


def test_surfaces_are_the_default_kind_and_refuse_the_group_options(tmp_path, capsys):
    bowl(1.0).save(str(tmp_path / "a.npz"))
    out = str(tmp_path / "f.png")
    assert main(["plot", "--kind", "surface", str(tmp_path / "a.npz"), "--out", out]) == 0
    assert_png_drawn(out)
    os.remove(out)
    capsys.readouterr()
    for extra, message in (
        ([], "no surfaces"),
        (["--group", "SGD", str(tmp_path / "a.npz")], "--group takes the inputs of --kind"),
        ([str(tmp_path / "a.npz"), "--x-axis", "epoch"], "--x-axis applies to --kind training"),
        ([str(tmp_path / "a.npz"), "--no-sharpness"], "--no-sharpness applies to --kind"),
    ):
        before = sorted(os.listdir(tmp_path))
        assert main(["plot", *extra, "--out", out]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert sorted(os.listdir(tmp_path)) == before
