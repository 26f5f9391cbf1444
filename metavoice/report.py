"""`python -m metavoice report DIR [--out report.html] [--embed]`: one HTML page about a dataset.

Reads the finalized Parquet files of an output directory (only the columns it plots, one record
batch at a time, so memory stays flat on large datasets) and their footers (errors, skips and
duplicates live only there), then writes:

    report.html            a summary table and eight figures with captions
    report_files/*.png     the figures (or, with --embed, inlined as data: URIs: one file to share)

Figures: duration histogram, sampling rates, languages, transcript length vs duration, audio
tokens per second, quality distributions (DNSMOS OVRL, SNR), hours kept vs cut-off, errors by type. Matplotlib runs headless (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.ticker import MaxNLocator

from pipeline.output import open_output
from pipeline.summary import Aggregates

COLUMNS = ["duration_sec", "sampling_rate", "language", "transcription", "tokens", "token_codebooks",
           "tokenizer", "whisper_model", "processed_at"]
QUALITY_COLUMNS = ["dnsmos_ovrl", "snr_db"]
DPI = 110
TOP_LANGUAGES = 20


@dataclass
class DatasetStats:
    """What the figures and the table need, gathered in one pass over the files."""

    files: list[str] = field(default_factory=list)  # finalized file names under data/
    aggregates: Aggregates = field(default_factory=Aggregates)  # merged footers: errors, skips, duplicates
    durations: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sampling_rates: Counter = field(default_factory=Counter)
    languages: Counter = field(default_factory=Counter)
    transcript_chars: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tokens_per_second: np.ndarray = field(default_factory=lambda: np.zeros(0))
    tokenizers: Counter = field(default_factory=Counter)
    whisper_models: Counter = field(default_factory=Counter)
    # quality scores per row (NaN where a row has none: DNSMOS off, files written before the columns)
    dnsmos_ovrl: np.ndarray = field(default_factory=lambda: np.zeros(0))
    snr_db: np.ndarray = field(default_factory=lambda: np.zeros(0))
    first_processed: datetime | None = None
    last_processed: datetime | None = None

    @property
    def rows(self) -> int:
        return int(self.durations.size)


def collect(output_dir: Path) -> DatasetStats:
    output = open_output(output_dir)
    stats = DatasetStats(files=output.finalized())
    durations, chars, tps, quality = [], [], [], {c: [] for c in QUALITY_COLUMNS}
    for name in stats.files:
        stats.aggregates.merge(output.read_footer(name).aggregates)
        f = pq.ParquetFile(output.data_path(name))
        held = [c for c in QUALITY_COLUMNS if c in f.schema_arrow.names]
        for batch in f.iter_batches(columns=COLUMNS + held, batch_size=4096):
            d = batch.column("duration_sec").to_numpy(zero_copy_only=False).astype(float)
            durations.append(d)
            for c in QUALITY_COLUMNS:
                quality[c].append(pc.fill_null(batch.column(c).cast(pa.float64()), float("nan")).to_numpy(
                    zero_copy_only=False) if c in held else np.full(len(d), np.nan))
            chars.append(pc.utf8_length(batch.column("transcription")).fill_null(0).to_numpy(zero_copy_only=False))
            codes = _codes_per_row(batch.column("tokens"))
            with np.errstate(divide="ignore", invalid="ignore"):
                tps.append(np.where(d > 0, codes / np.where(d > 0, d, 1), np.nan))
            stats.sampling_rates.update(batch.column("sampling_rate").to_pylist())
            stats.languages.update(batch.column("language").to_pylist())
            stats.tokenizers.update(batch.column("tokenizer").to_pylist())
            stats.whisper_models.update(batch.column("whisper_model").to_pylist())
            times = pc.min_max(batch.column("processed_at"))
            lo, hi = times["min"].as_py(), times["max"].as_py()
            if lo is not None:
                stats.first_processed = lo if stats.first_processed is None else min(stats.first_processed, lo)
                stats.last_processed = hi if stats.last_processed is None else max(stats.last_processed, hi)
    if durations:
        stats.durations = np.concatenate(durations)
        stats.transcript_chars = np.concatenate(chars).astype(float)
        t = np.concatenate(tps)
        stats.tokens_per_second = t[np.isfinite(t)]
        stats.dnsmos_ovrl, stats.snr_db = (np.concatenate(quality[c]) for c in QUALITY_COLUMNS)
    return stats


def _codes_per_row(tokens: pa.Array) -> np.ndarray:
    """Codes per row over all codebooks (frames x codebooks) without touching the code values."""
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    outer = tokens.offsets.to_numpy(zero_copy_only=False)  # into tokens.values (the codebook lists)
    inner = tokens.values.offsets.to_numpy(zero_copy_only=False)  # into the int16 values
    return (inner[outer[1:]] - inner[outer[:-1]]).astype(float)


# --- figures -----------------------------------------------------------------------------
def _figure(width: float = 6.4, height: float = 4.0):
    """A figure on the Agg canvas, outside pyplot: no global state, no display needed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, color="#777", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_durations(s: DatasetStats) -> bytes:
    fig, ax = _figure()
    ax.set_title("Clip duration")
    if s.rows:
        ax.hist(s.durations, bins=min(50, max(10, s.rows // 4)), color="#4c72b0", edgecolor="white")
        for value, label, style in ((float(np.mean(s.durations)), "mean", "--"), (float(np.median(s.durations)), "median", ":")):
            ax.axvline(value, color="#c44e52", linestyle=style, label=f"{label} {value:.1f} s")
        ax.legend()
        ax.set_xlabel("seconds")
        ax.set_ylabel("clips")
    else:
        _no_data(ax, "no rows")
    return _png(fig)


def plot_sampling_rates(s: DatasetStats) -> bytes:
    fig, ax = _figure()
    ax.set_title("Source sampling rates")
    if s.sampling_rates:
        rates = sorted(s.sampling_rates)
        ax.bar([f"{r / 1000:g} kHz" for r in rates], [s.sampling_rates[r] for r in rates], color="#55a868")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("clips")
    else:
        _no_data(ax, "no rows")
    return _png(fig)


def plot_languages(s: DatasetStats) -> bytes:
    fig, ax = _figure()
    top = s.languages.most_common(TOP_LANGUAGES)
    ax.set_title("Detected languages" + (f" (top {TOP_LANGUAGES} of {len(s.languages)})" if len(s.languages) > TOP_LANGUAGES else ""))
    if top:
        names = [name or "(none)" for name, _ in reversed(top)]
        ax.barh(names, [n for _, n in reversed(top)], color="#8172b3")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("clips")
    else:
        _no_data(ax, "no rows")
    return _png(fig)


def plot_transcript_vs_duration(s: DatasetStats) -> bytes:
    fig, ax = _figure()
    ax.set_title("Transcript length vs duration")
    if s.rows:
        ax.scatter(s.durations, s.transcript_chars, s=12, alpha=0.6, color="#dd8452", edgecolors="none")
        ax.set_xlabel("duration (seconds)")
        ax.set_ylabel("transcript (characters)")
        empty = int(np.sum(s.transcript_chars == 0))
        if empty:
            ax.text(0.02, 0.95, f"{empty} empty transcript{'s' if empty != 1 else ''}", transform=ax.transAxes, va="top")
        ax.grid(alpha=0.3)
    else:
        _no_data(ax, "no rows")
    return _png(fig)


def plot_tokens_per_second(s: DatasetStats) -> bytes:
    fig, ax = _figure()
    ax.set_title("Audio tokens per second (frames x codebooks / duration)")
    if s.tokens_per_second.size:
        ax.hist(s.tokens_per_second, bins=min(50, max(10, s.tokens_per_second.size // 4)), color="#937860", edgecolor="white")
        ax.set_xlabel("tokens per second of audio")
        ax.set_ylabel("clips")
    else:
        _no_data(ax, "no tokens")
    return _png(fig)


def plot_errors(s: DatasetStats) -> bytes:
    fig, ax = _figure()
    errors = s.aggregates.errors.most_common()
    ax.set_title(f"Dead letters by error type ({sum(n for _, n in errors)})")
    if errors:
        ax.barh([k for k, _ in reversed(errors)], [n for _, n in reversed(errors)], color="#c44e52")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("inputs")
    else:
        _no_data(ax, "no errors")
    return _png(fig)


def plot_quality(s: DatasetStats) -> bytes:
    """DNSMOS OVRL and SNR histograms side by side, the summary's cut-offs marked."""
    from matplotlib.figure import Figure

    from pipeline.summary import DNSMOS_CUTOFF, SNR_CUTOFF_DB

    fig = Figure(figsize=(9.6, 4.0), dpi=DPI, layout="constrained")
    for i, (values, title, unit, cut) in enumerate(((s.dnsmos_ovrl, "DNSMOS OVRL", "MOS (1-5)", DNSMOS_CUTOFF),
                                                     (s.snr_db, "SNR", "dB", SNR_CUTOFF_DB))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.set_title(title)
        v = values[np.isfinite(values)]
        if v.size:
            ax.hist(v, bins=min(40, max(10, v.size // 4)), color="#55a868", edgecolor="white")
            ax.axvline(cut, color="#c44e52", linestyle="--", label=f"cut-off {cut:g}")
            ax.legend()
            ax.set_xlabel(unit)
            ax.set_ylabel("rows")
        else:
            _no_data(ax, "no scores")
    return _png(fig)


def hours_kept(durations: np.ndarray, scores: np.ndarray, cutoffs: np.ndarray) -> np.ndarray:
    """Hours of rows whose score is at least each cut-off (rows without a score are never kept)."""
    ok = np.isfinite(scores)
    d, v = durations[ok], scores[ok]
    return np.array([float(d[v >= c].sum()) / 3600 for c in cutoffs])


def plot_hours_kept(s: DatasetStats) -> bytes:
    fig, ax = _figure()
    ax.set_title("Hours kept vs cut-off")
    curves = [(s.dnsmos_ovrl, np.linspace(1.0, 5.0, 41), "DNSMOS OVRL >= x (x: 1-5)"),
              (s.snr_db, np.linspace(-5.0, 40.0, 46), "SNR >= x dB (x: -5-40)")]
    drawn = False
    for values, grid, label in curves:
        if s.rows and np.isfinite(values).any():
            ax.plot((grid - grid[0]) / (grid[-1] - grid[0]), hours_kept(s.durations, values, grid), label=label)
            drawn = True
    if drawn:
        ax.legend()
        ax.set_xlabel("cut-off, from its lowest to its highest value")
        ax.set_ylabel("hours kept")
    else:
        _no_data(ax, "no scores")
    return _png(fig)


FIGURES = [
    ("durations", "Duration histogram", plot_durations,
     "How long the clips are. Spikes at the configured minimum or maximum duration hint at clipped or padded uploads."),
    ("sampling_rates", "Sampling rates", plot_sampling_rates,
     "The rates the sources were recorded at (audio is resampled to 16 kHz for Whisper; the original rate is kept in the row)."),
    ("languages", "Languages", plot_languages,
     "The language Whisper detected per clip. An English-only model (`.en`) reports every clip as English."),
    ("transcript_vs_duration", "Transcript length vs duration", plot_transcript_vs_duration,
     "Each dot is a clip. Speech runs at about 10-20 characters per second; dots on the x axis are silent or failed "
     "transcriptions, dots far above the cloud are hallucinations."),
    ("tokens_per_second", "Audio tokens per second", plot_tokens_per_second,
     "Codes per second of audio over all codebooks. A fixed-rate codec gives one narrow peak at frame rate x codebooks; "
     "a spread means truncated or padded token sequences."),
    ("quality", "Quality distributions", plot_quality,
     "DNSMOS P.835 overall and SNR per row (utterance or file), with the cut-offs summary.json counts hours above."),
    ("hours_kept", "Hours kept vs cut-off", plot_hours_kept,
     "How much audio a quality filter keeps as its threshold rises: pick the cut-off where the curve bends."),
    ("errors", "Errors by type", plot_errors,
     "Inputs that became dead letters instead of rows, by the error class the pipeline named (see pipeline/errors.py)."),
]


# --- the page ----------------------------------------------------------------------------
def render_report(output_dir: Path, out: Path | None = None, embed: bool = False) -> Path:
    output_dir = Path(output_dir)
    out = Path(out) if out is not None else output_dir / "report.html"
    stats = collect(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    assets = out.with_name(f"{out.stem}_files")
    images: list[tuple[str, str, str]] = []  # (src, title, caption)
    for name, title, plot, caption in FIGURES:
        png = plot(stats)
        if embed:
            src = "data:image/png;base64," + base64.b64encode(png).decode()
        else:
            assets.mkdir(exist_ok=True)
            (assets / f"{name}.png").write_bytes(png)
            src = f"{assets.name}/{name}.png"
        images.append((src, title, caption))
    out.write_text(_html(output_dir, stats, images), encoding="utf-8")
    return out


def _table_rows(s: DatasetStats) -> list[tuple[str, str]]:
    a = s.aggregates
    total = float(np.sum(s.durations)) if s.rows else 0.0
    rows = [
        ("rows", f"{s.rows:,}"),
        ("audio", f"{total / 3600:.2f} h ({total:,.1f} s)"),
        ("duration min / median / max", "-" if not s.rows else
         f"{np.min(s.durations):.2f} / {np.median(s.durations):.2f} / {np.max(s.durations):.2f} s"),
        ("Parquet files", f"{len(s.files):,}"),
        ("dead letters", f"{sum(a.errors.values()):,}"),
        ("skipped events", f"{a.skipped:,}"),
        ("delete events (rows removed)", f"{a.delete_events:,} ({a.deleted:,})"),
        ("duplicate events", f"{a.duplicates:,}"),
        ("languages", f"{len(s.languages):,}"),
        ("whisper model", ", ".join(sorted(k for k in s.whisper_models if k)) or "-"),
        ("tokenizer", ", ".join(sorted(k for k in s.tokenizers if k)) or "-"),
    ]
    if s.first_processed is not None:
        rows.append(("processed", f"{s.first_processed:%Y-%m-%d %H:%M} - {s.last_processed:%Y-%m-%d %H:%M} UTC"))
    return rows


def _html(output_dir: Path, s: DatasetStats, images: list[tuple[str, str, str]]) -> str:
    e = html.escape
    table = "\n".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _table_rows(s))
    figures = "\n".join(
        f'<figure><h2>{e(title)}</h2><img src="{e(src)}" alt="{e(title)}"><figcaption>{e(caption)}</figcaption></figure>'
        for src, title, caption in images
    )
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Metavoice dataset report: {e(output_dir.name or str(output_dir))}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 75rem; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 2rem; }}
th, td {{ text-align: left; padding: .25rem 1rem .25rem 0; border-bottom: 1px solid #ddd; }}
.figures {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(34rem, 1fr)); gap: 1.5rem; }}
figure {{ margin: 0; }} figure img {{ max-width: 100%; }} figcaption {{ color: #555; font-size: .9rem; }}
h2 {{ font-size: 1.1rem; margin-bottom: .3rem; }}
</style></head>
<body>
<h1>Dataset report</h1>
<p><code>{e(str(output_dir))}</code> - made {e(made)} from {len(s.files)} finalized Parquet file(s).</p>
<table>
{table}
</table>
<div class="figures">
{figures}
</div>
</body></html>
"""


def run_report(output_dir: Path, out: Path | None = None, embed: bool = False) -> int:
    from rich.console import Console

    console = Console()
    if not Path(output_dir).is_dir():
        console.print(f"[red]{output_dir} is not a directory[/]")
        return 2
    path = render_report(output_dir, out, embed)
    console.print(f"report: {path}" + ("" if embed else f" (figures in {path.with_name(path.stem + '_files')})"))
    return 0
