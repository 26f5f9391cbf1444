"""`python -m benchmark`: the stream's throughput, ceiling, latency and memory, against the seed and bare faster-whisper.

One run, one machine, one loaded model and the same decoding settings (model, beam size,
language, tokenizer) for every speech mode. Speech figures are audio-seconds per wall-second;
the ceiling's are events per second.

    seed                       list the bucket; per file, in turn: download (boto3), decode,
                               faster-whisper `transcribe()`, tokenize; one Parquet at the end
    bare                       faster-whisper's `BatchedInferencePipeline.transcribe(batch_size=B)`
                               per file, audio decoded in advance (no I/O)
    model                      `WhisperTranscriber.transcribe_batch(all clips)`, audio decoded in
                               advance: the pipeline's exact model call - its ceiling
    model-segment              the pipeline's segment stage (Silero VAD; speaker changes in utterances
                               mode) on every clip at once, audio decoded in advance
    model-score                its score stage (DNSMOS where on, speaker embeddings and labels, signal
                               measures) on the segment stage's spans
    pipeline                   backfill -> Kafka -> consumer (Prefect on) -> Parquet + summary.json
    pipeline-no-prefect        the same with prefect_enabled=False
    io-floor                   list, download `download_concurrency` at a time and decode
                               `--ceiling-events` small objects with the pipeline's decode_stage
                               (Whisper's 16 kHz view and the tokenizer's): the I/O and our decode
    plain-floor                the floor a user would write: aiobotocore list, 8 GETs at a time,
                               soundfile at the native rate - none of our costs
    stream-ceiling             the consumer (Prefect on, transcription off, a tokenizer that costs
                               nothing) on the same objects waiting in the topic: what the stream
                               itself costs per event once the models are fast (a GPU)
    stream-ceiling-no-prefect  the same with prefect_enabled=False
    stream-ceiling-s3-output   stream-ceiling writing its dataset to an s3:// prefix (spool, uploads,
                               compare-and-swap summary) instead of a local directory
    latency                    events published at a steady rate, files rolled every second:
                               publish -> row in a finalized file, per event
    backlog                    `--backlog-events` waiting in the topic; the consumer runs for a
                               bounded time in a child process whose RSS is sampled

Ratios: pipeline/seed, pipeline/bare, pipeline/model, stream-ceiling/io-floor,
stream-ceiling/plain-floor and stream-ceiling/stream-ceiling-no-prefect (Prefect on/off), with issue 13's targets, and
stream-ceiling-s3-output/stream-ceiling (what the object-store output costs).

A stream run's consumer is started first and has joined its group when its clock starts (its
start-up is reported, not timed); the run ends when every event published is accounted for
(never on an idle timeout) and the consumer has drained, finalized and committed. Every wait is
bounded and fails with a message naming what it waited for.

Performance claims come from this script, never from a timed test: tests/test_bench_smoke.py
only checks that it runs and reports every mode. See docs/benchmarks.md.

One module per mode, and what they share:

    seed.py         seed
    bare.py         bare
    model.py        model
    stream.py       pipeline, pipeline-no-prefect
    io_floor.py     io-floor
    ceiling.py      stream-ceiling, stream-ceiling-no-prefect, stream-ceiling-s3-output (and the ceiling modes in turn)
    latency.py      latency
    backlog.py      backlog memory (child processes)
    harness.py      the production consumer in a run: Prefect's warm-up, start, probe, bounded stop
    measure.py      RSS, CPU by process, a mode's result, bounded waits
    corpus.py       spoken clips, small objects, copies, word overlap
    run.py          one run: services, corpora, every mode, ratios, targets
    report.py       the printed report
    cli.py          the command line (`python -m benchmark`, `metavoice bench`)

The benchmark sits on top of everything: it drives consumer/, producer/ and broker/ and uses
metavoice/'s embedded services and spoken clips; nothing imports it but `metavoice bench`, lazily
(tests/test_layout.py).
"""

from .run import MODES, PASSES, RATIOS

__all__ = ["MODES", "PASSES", "RATIOS", "main"]


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(argv)
