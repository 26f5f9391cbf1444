"""`python -m metavoice tokens decode`: listen to a row's audio tokens.

    python -m metavoice tokens decode --parquet output/part-0001.parquet --id speech/clip-01.flac --out clip.wav

The row's `tokenizer` column names the codec, its checkpoint and its bandwidth or codebooks
(`encodec:facebook/encodec_24khz@6kbps`); the same codec is rebuilt from it and decodes the row's
`tokens` to a 16-bit WAV at the codec's rate. Weights come from `--weights`, else
`METAVOICE_TOKENIZER_WEIGHTS`, else the checkpoint the column names (hub cache, see docs/tokenizers.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import TOKENIZERS, Settings
from pipeline.errors import ModelUnavailable

if TYPE_CHECKING:
    import numpy as np

# NumPy, Arrow, soundfile and the tokenizers are imported where a row is read or decoded: building
# the command line (`metavoice --help`, in the producers' base install too) needs none of them.


class RowNotFound(LookupError):
    pass


def parquet_files(path: str | Path) -> list[Path]:
    """`path` itself, or the `*.parquet` files under it (an output directory keeps them in `data/`;
    in-progress `.parquet.inprogress` files, hidden and `_` files are left out)."""
    root = Path(path)
    if not root.is_dir():
        return [root]
    files = [
        f for f in sorted(root.rglob("*.parquet"))
        if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(root).parts)
    ]  # fmt: skip
    if not files:
        raise RowNotFound(f"no Parquet files under {str(root)!r}")
    return files


def read_row_tokens(parquet_path: str | Path, row_id: str) -> tuple[np.ndarray, str]:
    """The `tokens` (int16 `[codebooks, frames]`) and `tokenizer` of the row whose `id` is `row_id`.

    `parquet_path` is one file or a directory of them; when a key was written more than once
    (a forced reprocess), the last row read wins.
    """
    import pyarrow.dataset as ds

    from pipeline.records import tokens_from_column

    dataset = ds.dataset([str(f) for f in parquet_files(parquet_path)], format="parquet")
    rows = dataset.to_table(columns=["id", "tokenizer", "tokens"], filter=ds.field("id") == row_id)
    if rows.num_rows == 0:
        raise RowNotFound(f"no row with id {row_id!r} in {str(parquet_path)!r}")
    last = rows.num_rows - 1
    return tokens_from_column(rows["tokens"][last].as_py()), str(rows["tokenizer"][last].as_py() or "")


def decode_row_to_wav(parquet_path: str | Path, row_id: str, out_path: str | Path, settings: Settings) -> Path:
    """Decode one row's tokens with the codec its `tokenizer` column names; write a 16-bit WAV."""
    import numpy as np
    import soundfile as sf

    from pipeline.tokenizers import load_tokenizer

    tokens, tokenizer = read_row_tokens(parquet_path, row_id)
    family = tokenizer.split(":", 1)[0]
    if family in ("", "synthetic"):
        raise ValueError(
            f"row {row_id!r} was tokenized by {tokenizer or 'nothing'!r}, whose codes carry no audio; only "
            "neural codec tokens (encodec, dac, mimi) can be decoded"
        )
    if family not in TOKENIZERS:
        raise ValueError(f"row {row_id!r} was tokenized by {tokenizer!r}, which this version cannot decode "
                         f"(it knows {', '.join(TOKENIZERS)})")
    if tokens.size == 0:
        raise ValueError(f"row {row_id!r} holds no tokens")
    codec = load_tokenizer(settings.with_overrides(tokenizer=tokenizer))
    try:
        audio, rate = codec.decode(tokens)
    finally:
        codec.close()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(out, np.clip(audio, -1.0, 1.0), rate, subtype="PCM_16")
    return out


def add_tokens_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("tokens", help="work with the audio tokens of the Parquet output")
    commands = parser.add_subparsers(dest="tokens_command", required=True, metavar="COMMAND")
    decode = commands.add_parser(
        "decode",
        help="reconstruct one row's audio from its tokens, to listen to it",
        description="Decode a row's tokens with the codec named in its tokenizer column and write a WAV file.",
    )
    decode.add_argument("--parquet", required=True, type=Path, help="a Parquet file, or a directory of them")
    decode.add_argument("--id", required=True, dest="row_id", help="the row's id (the object key)")
    decode.add_argument("--out", required=True, type=Path, help="the WAV file to write")
    decode.add_argument(
        "--weights",
        default=None,
        help="codec weights: a local directory or hub id (default: METAVOICE_TOKENIZER_WEIGHTS, "
        "else the checkpoint named in the row's tokenizer column)",
    )
    decode.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: METAVOICE_DEVICE")
    return parser


def run_tokens_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.tokens_command == "decode":
        settings = settings.with_overrides(tokenizer_weights=args.weights, device=args.device)
        try:
            out = decode_row_to_wav(args.parquet, args.row_id, args.out, settings)
        except (RowNotFound, ModelUnavailable, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(out)
        return 0
    print(f"error: unknown tokens command {args.tokens_command!r}", file=sys.stderr)
    return 2
