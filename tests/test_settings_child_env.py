"""A child process (a consumer the tests or the benchmark start) gets every setting the parent chose."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pydantic import SecretStr

from pipeline.config import Settings

from .consumer_process import settings_env

READ_BACK = "import json; from pipeline.config import Settings; print(Settings().model_dump_json())"


def test_a_child_process_sees_segmentation_dnsmos_and_every_other_chosen_setting(tmp_path):
    chosen = dict(
        segmentation="utterances", dnsmos="on", utterance_min_sec=1.5, utterance_max_sec=12.0,
        utterance_pause_sec=0.8, analysis=True, whisper_window="full", transcribe=False,
        output_dir=tmp_path / "out", batch_max_events=3, prefect_enabled=False,
        s3_access_key_id=SecretStr("AKIA-parent"), s3_secret_access_key=SecretStr("parent-secret"),
    )
    parent = Settings(**chosen)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("METAVOICE_")}, **settings_env(parent)}
    out = subprocess.run([sys.executable, "-c", READ_BACK], env=env, capture_output=True, text=True,
                         timeout=120, check=True, cwd=os.getcwd())
    child = json.loads(out.stdout)
    want = json.loads(parent.model_dump_json())
    for name in chosen:
        if name.startswith("s3_"):  # secrets never travel in the environment we build
            assert child[name] is None and "parent-secret" not in json.dumps(env)
        else:
            assert child[name] == want[name], name
    assert child["batch_max_events_backlog"] == 3  # derived again in the child, as in the parent
