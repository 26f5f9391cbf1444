"""The `metavoice` command and the tools around the stream: they sit above consumer/, producer/
and broker/ and may import all of them and the core (pipeline/); nothing below imports them
(tests/test_layout.py).

    cli.py             the `metavoice` command (`python -m metavoice`): consume, produce, demo, bench,
                       report, summary, tokens
    demo.py            `metavoice demo`: the whole system on embedded defaults, on this machine
    report.py          `metavoice report`: an HTML page with figures about an output directory
    summary.py         `metavoice summary`: summary.json at a glance; --rebuild checks it
    tokens.py          `metavoice tokens decode`: a row's audio tokens back to a WAV file
    local_services.py  an embedded Tansu broker and a moto S3 server on free ports (demo, benchmark, tests)
    samples.py         spoken test clips (espeak-ng) and the word overlap that scores transcripts
"""
