"""Per-utterance analysis beside Whisper: VAD cuts (vad), signal and DNSMOS quality (quality), speaker
embeddings and labels (speakers), and transcript flags (flags). Each model is a small class with a
`name` (recorded in rows and `_manifest.json`), loaded once and run in batches on the device thread."""
