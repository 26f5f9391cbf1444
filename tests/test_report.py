"""`metavoice report` (metavoice/report.py): an HTML page with six real figures about an output directory."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from metavoice.cli import main
from metavoice.report import FIGURES, _codes_per_row, collect

from .datasets import CODEBOOKS, FRAME_RATE, write_dataset

FIGURE_NAMES = [name for name, *_ in FIGURES]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("report") / "out", rows=120, files=3)


def assert_real_png(data: bytes) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000, "a figure with axes, bars and labels is more than a blank canvas"
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        assert img.width >= 400 and img.height >= 250
        colours = len(img.convert("RGB").resize((160, 100)).getcolors(maxcolors=16_000) or [])
        assert colours > 20, "a drawn figure, not a flat image"


def test_report_writes_html_and_six_decodable_figures_beside_it(dataset, tmp_path):
    out = tmp_path / "site" / "report.html"
    assert main(["report", str(dataset), "--out", str(out)]) == 0
    html = out.read_text()
    assets = tmp_path / "site" / "report_files"
    assert sorted(p.stem for p in assets.glob("*.png")) == sorted(FIGURE_NAMES)
    for name in FIGURE_NAMES:
        assert f'src="report_files/{name}.png"' in html
        assert_real_png((assets / f"{name}.png").read_bytes())
    for title in ("Duration histogram", "Sampling rates", "Languages", "Transcript length vs duration",
                  "Audio tokens per second", "Errors by type"):
        assert title in html


def test_embedded_report_is_one_self_contained_file(dataset, tmp_path):
    out = tmp_path / "one.html"
    assert main(["report", str(dataset), "--out", str(out), "--embed"]) == 0
    assert not (tmp_path / "one_files").exists()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', out.read_text())
    assert len(images) == len(FIGURES)
    for b64 in images:
        assert_real_png(base64.b64decode(b64))


def test_report_defaults_to_the_output_directory(tmp_path):
    out_dir = write_dataset(tmp_path / "out", rows=12, files=1)
    assert main(["report", str(out_dir)]) == 0
    assert (out_dir / "report.html").exists() and len(list((out_dir / "report_files").glob("*.png"))) == len(FIGURES)


def test_report_numbers_are_the_datasets(dataset, tmp_path):
    stats = collect(dataset)
    assert stats.rows == 120 and len(stats.files) == 3
    assert sum(stats.aggregates.errors.values()) == 6 and stats.aggregates.skipped == 2
    assert stats.sampling_rates == {16_000: 24, 22_050: 24, 24_000: 24, 44_100: 24, 48_000: 24}
    # frames x codebooks / duration: at most the codec's rate, lower for the truncated rows
    assert stats.tokens_per_second.max() == pytest.approx(FRAME_RATE * CODEBOOKS, rel=0.05)
    assert (stats.tokens_per_second < FRAME_RATE * CODEBOOKS * 0.99).any()
    out = tmp_path / "r.html"
    main(["report", str(dataset), "--out", str(out), "--embed"])
    html = out.read_text()
    assert "<th>rows</th><td>120</td>" in html and "<th>dead letters</th><td>6</td>" in html
    assert "tiny.en" in html and "synthetic" in html


def test_an_empty_output_directory_still_gets_a_report(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "empty.html"
    assert main(["report", str(empty), "--out", str(out)]) == 0
    assert "<th>rows</th><td>0</td>" in out.read_text()
    for name in FIGURE_NAMES:  # "no rows" placeholders, still valid images
        with Image.open(tmp_path / "empty_files" / f"{name}.png") as img:
            img.verify()


def test_a_missing_directory_is_exit_code_2_with_one_line_on_stderr(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'nope'} is not a directory"), err


def test_codes_per_row_follow_offsets_of_sliced_arrays():
    rows = [np.zeros((2, 3)), np.zeros((0, 0)), np.zeros((4, 5)), np.zeros((1, 7))]
    arr = pa.array([r.tolist() for r in rows], type=pa.list_(pa.list_(pa.int16())))
    assert _codes_per_row(arr).tolist() == [6, 0, 20, 7]
    assert _codes_per_row(arr.slice(1, 3)).tolist() == [0, 20, 7]
    assert _codes_per_row(pa.chunked_array([arr.slice(0, 2), arr.slice(2)])).tolist() == [6, 0, 20, 7]


def test_hours_kept_counts_only_rows_at_or_above_the_cut_off_and_never_unscored_ones():
    import numpy as np

    from metavoice.report import hours_kept

    durations = np.array([3600.0, 1800.0, 900.0, 360.0])
    scores = np.array([3.5, 2.0, np.nan, 3.0])  # the third row has no score (DNSMOS off)
    assert hours_kept(durations, scores, np.array([1.0, 3.0, 4.0])).tolist() == [1.6, 1.1, 0.0]
