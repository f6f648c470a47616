"""Run every benchmark the README's performance table cites and regenerate that table (not a test).

Each benchmark runs as its own process (``OMP_NUM_THREADS`` as given, default 1), its JSON result
is kept under ``--out`` (default ``bench-results/<date>/``), and each table row names the command
that produced it, the machine and the date. The table between the ``perf-table`` markers of
README.md is replaced (``--no-readme`` to leave the README alone); rows measured by hand (whole
recipe runs, GPU checks) live in the README's other table and are not touched.

    OMP_NUM_THREADS=1 python eval/bench/run_all.py [--only NAME ...] [--quick] [--no-readme]
    eval/bench/run_all                         # the same, as a command

``--only NAME ...`` replaces just those benchmarks' rows in the README's table (each dated).
``--quick`` shrinks the slow ones (fewer repeats, no 1 GiB load file) for a smoke run. The sDPO
cycle needs a toy SFT export: ``--sdpo-init PATH``, else a short toy SFT run (300 steps) is made
first. PER throughput is measured by ``eval/bench/bench_per.py`` when the ``.[eval]`` extra and its
test assets are installed, and skipped (said so in the row) otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from levo_infer.jsonio import write_text_atomic

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
START, END = "<!-- perf-table:start (eval/bench/run_all.py writes this table) -->", "<!-- perf-table:end -->"

Row = tuple[str, str, str]  # what, ours, reference


@dataclass
class Bench:
    name: str
    command: list[str]                 # argv after `python`, relative to the repo
    rows: Callable[[dict[str, Any]], list[Row]]
    json_flag: bool = False            # the script writes its JSON with --json PATH (else: last JSON on stdout)
    timeout: int = 900


def _f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


# ----------------------------------------------------------------------------- row formatters
def rows_train(r: dict) -> list[Row]:
    m, c = r["model"], r["model"]["config"]
    out = [(f"training step, LeLM dim {c['dim']}, {c['layers']}+{c['layers_sub']} layers, {c['code_size']} codes, "
            f"batch {c['batch']} × {c['frames']} frames", f"{m['ours_frames_per_s']:.0f} frames/s",
            f"our re-creation of the released step (not the released code): {m['naive_frames_per_s']:.0f} frames/s "
            f"(**{m['speedup']:.1f}×**); losses {m['loss_ours']:.4f} / {m['loss_naive']:.4f}")]
    ld = r.get("loader")
    if ld:
        w = {k: v for k, v in ld.items() if k.startswith("workers")}
        ours = ", ".join(f"{v / 1e3:.0f}k frames/s ({k.removeprefix('workers').removesuffix('_frames_per_s')} workers)"
                         for k, v in w.items())
        tm = ld.get("toy_model_frames_per_s")
        ref = f"the toy SFT model trains at {tm / 1e3:.1f}k frames/s: the loader is {max(w.values()) / tm:.0f}× faster" \
            if tm else "—"
        out.append(("data loader (toy shards, batch 32)", ours, ref))
    return out


def rows_dpo(r: dict) -> list[Row]:
    c, ratio = r["config"], r["ratio_to_sft"]
    return [(f"DPO step vs SFT step on the same songs (dim {c['dim']}, {c['layers']}+{c['layers_sub']} layers, "
             f"{c['code_size']} codes, {r['batch'].get('songs', '')} songs)",
             f"precomputed reference: {ratio['dpo_precomputed']:.2f}× the SFT step",
             f"live reference model: {ratio['dpo_live']:.2f}× (goal ≤ 2.2×)")]


def rows_infer(r: dict) -> list[Row]:
    out: list[Row] = []
    gen = r.get("generation") or []
    if gen:
        cache = {(g["batch"], g["frames_per_song"]): g for g in gen if g["path"] == "kv-cache"}
        nocache = {(g["batch"], g["frames_per_song"]): g for g in gen if g["path"] == "no-cache"}
        for (b, f), g in sorted(cache.items()):
            ref = nocache.get((b, f))
            out.append((f"generation, batch {b}, {f} frames/song (released 952-token prefix, CFG)",
                        f"{g['frames_per_s']:.0f} frames/s",
                        f"our own generate without the KV cache (not the released code): {ref['frames_per_s']:.1f} "
                        f"frames/s ({g['frames_per_s'] / ref['frames_per_s']:.0f}×)" if ref else "—"))
    loads = r.get("loading") or []
    base = next((x for x in loads if x["mode"] == "recreated-released-load"), None)
    ref = (f"our re-creation of the released load (`torch.load` + `load_state_dict` into an fp32 model; not the "
           f"released code): {base['peak_over_file']:.2f} × file" if base else "—")
    for row in loads:
        if row is base:
            continue
        out.append((f"loading a {row['file_gib']:.2f} GiB bf16 model.pt, mode `{row['mode']}` (peak RSS)",
                    f"{row['peak_over_file']:.2f} × file, {row['peak_over_model']:.2f} × the fp32 model", ref))
    return out


def rows_engine(r: dict) -> list[Row]:
    out: list[Row] = []
    la = r.get("latency")
    if la:
        ref = (f"main before issue #22 (`--baseline-src`): {la['baseline_songs_per_s']:.3f} songs/s "
               f"({la['baseline_seconds_per_song']:.2f} s/song): **{la['speedup']:.2f}×**"
               if "baseline_songs_per_s" in la else "— (`--baseline-src DIR` with main before #22 compares)")
        out.append((f"generation, batch 1, one {la['frames']}-frame song with v2's delays ({la['steps']} pattern steps; "
                    "dim 256, 2+1 layers, 952-token prefix, CFG, compat top-k 50)",
                    f"{la['songs_per_s']:.3f} songs/s ({la['seconds_per_song']:.2f} s/song, {la['ms_per_step']:.1f} "
                    "ms/step)", ref))
    for mx in r.get("mixed", []) + ([r["mixed_toy"]] if r.get("mixed_toy") else []):
        what = (f"continuous vs static batching, {mx['slots']} slots, {mx['songs']} songs: " +
                (f"{mx['distribution']} (mean {mx['frames_mean']:.1f}, {mx['frames_min']}–{mx['frames_max']})"
                 if "frames_min" in mx else f"{mx['distribution']}, delays {mx['delays']}"))
        c, st, sd = mx["continuous"], mx["static"], mx.get("static-drop")
        drop = (f"; static-drop (finished songs leave the step) {sd['songs_per_s']:.2f} songs/s: continuous "
                f"{mx['speedup_vs_static_drop']:.2f}× of it" if sd else "")
        out.append((what, f"continuous {c['songs_per_s']:.2f} songs/s, {c['frames_per_s']:.0f} frames/s "
                          f"(**{mx['speedup']:.2f}×** static)",
                     f"static (a batch holds its slots until its longest song ends) {st['songs_per_s']:.2f} songs/s, "
                     f"{st['frames_per_s']:.0f} frames/s; decode steps {st['decode_steps']} → {c['decode_steps']}{drop}; "
                     f"same songs bit for bit: {'yes' if mx['bit_identical'] else 'NO'}"))
    pc = r.get("planner_check")
    if pc:
        ours = "; ".join(f"{size} " + ", ".join(f"{x['slots']} slots {x['measured_mib']:.0f} MiB ({x['error']:+.1%})"
                                                 for x in pc if x["size"] == size)
                         for size in dict.fromkeys(x["size"] for x in pc))
        ref = "; ".join(f"{size} " + ", ".join(f"{x['predicted_mib']:.0f}" for x in pc if x["size"] == size) + " MiB"
                        for size in dict.fromkeys(x["size"] for x in pc))
        out.append((f"memory planner: measured peak RSS of a generation ({pc[0]['frames']}-frame songs, fp32) vs "
                    "predicted", ours, f"predicted: {ref}"))
    v2 = r.get("planner_v2_large")
    if v2:
        by = {(x["card_gb"], x["kv"]): x for x in v2}
        ours = "; ".join(f"{gb} GB: {by[(gb, 'bf16')]['slots']} (8-bit KV: {by[(gb, '8-bit')]['slots']})"
                         for gb in sorted({x['card_gb'] for x in v2}))
        one = next(x for x in v2 if x["slots"])
        out.append(("memory planner, v2-large (bf16 weights), slots for 270 s songs with CFG per card",
                    ours, f"weights {one['weights_gib']:.2f} GiB; KV cache per song "
                          f"{next(x for x in v2 if x['kv'] == 'bf16' and x['slots'])['cache_gib_per_song']:.2f} GiB "
                          f"bf16, {next(x for x in v2 if x['kv'] == '8-bit')['cache_gib_per_song']:.2f} GiB 8-bit"))
    kv = r.get("kv8")
    if kv and kv.get("toy"):
        t = kv["toy"]
        le = t["logit_error"]
        out.append((f"8-bit KV cache vs the model's dtype: toy SFT export, {t['n']} held-out songs (same seeds)",
                    f"quality {t['8bit']['quality']:.3f} ± {t['8bit']['se']:.3f} vs {t['full']['quality']:.3f} ± "
                    f"{t['full']['se']:.3f} (paired difference {t['paired_diff']:+.4f} ± {t['paired_se']:.4f})",
                    f"logit error along the same tokens: max {le['max_abs']:.3g}, mean {le['mean_abs_over_logit_std']:.2g}"
                    f" × the logits' std, argmax agreement {le['argmax_agreement']:.3f}"))
    return out


def rows_strategies(r: dict) -> list[Row]:
    s = r["strategies"]
    ours = "; ".join(f"{k} {v['step_ms']:.0f} ms, held {v['held_mib']:.1f} MiB, peak RSS +{v['above_pg_mib']:.0f} MiB"
                     for k, v in s.items())
    ref = "memory model (static bytes per rank): " + ", ".join(f"{k} {v['model_mib']:.1f} MiB" for k, v in s.items())
    return [(f"training step per strategy, 2 CPU ranks (gloo), {r['params_m']:.1f} M parameters", ours, ref)]


def rows_meta_init(r: dict) -> list[Row]:
    c, gb = r["config"], (lambda x: f"{x / 1e9:.1f} GB")
    what = (f"building a sharded {r['method'].upper()} model on {r['world']} CPU ranks (fsdp2), dim {c['dim']}, "
            f"{c['layers']}+{c['layers_sub']} layers, {c['code_size']} codes ({r['params'] / 1e9:.2f} B params, "
            f"{gb(r['file_bytes'])} fp32 model.init): peak RSS above the rank's start")
    meta = {x["rank"]: x for x in r["meta"]}
    ours = (f"meta-device init: rank 1 +{gb(meta[1]['peak_above_before'])} (its shards {gb(meta[1]['shard_bytes'])} + "
            f"largest tensor {gb(r['largest_tensor_bytes'])}), rank 0 +{gb(meta[0]['peak_above_before'])} (adds the "
            f"memory-mapped init file); {meta[1]['seconds']:.0f} s")
    legacy = {x["rank"]: x for x in r.get("legacy", [])}
    ref = (f"every rank building the whole model first (`strategy.meta_init=false`, the path before): rank 1 "
           f"+{gb(legacy[1]['peak_above_before'])}, rank 0 +{gb(legacy[0]['peak_above_before'])}" if legacy else "—")
    out = [(what, ours, ref)]
    e, el = r.get("export"), r.get("export_legacy")
    if e:
        out.append((f"consolidating that checkpoint (a DCP folder) into a {gb(r['file_bytes'])} model.pt: peak RSS",
                    f"streamed tensor by tensor: +{gb(e['peak_above_before'])} ({e['seconds']:.0f} s)",
                    f"the whole state dict, a model loaded from it, torch.save (the export before): "
                    f"+{gb(el['peak_above_before'])} ({el['seconds']:.0f} s)" if el else "—"))
    return out


def rows_lora(r: Any) -> list[Row]:
    rows = {x["variant"]: x for x in (r if isinstance(r, list) else r.get("rows", []))}
    f, lo = rows.get("full"), rows.get("lora")
    if not (f and lo):
        return []
    return [(f"DPO step memory, {f['params'] / 1e6:.0f} M parameters: peak RSS above the policy's weights",
             f"LoRA r 16, adapters-off reference: {lo['peak_above_policy_mib']:.0f} MiB ({lo['step_seconds']:.1f} s/step)",
             f"full fine-tuning with a frozen reference copy: {f['peak_above_policy_mib']:.0f} MiB "
             f"({f['step_seconds']:.1f} s/step)")]


def rows_sdpo(r: dict) -> list[Row]:
    m, p = r.get("measured_cpu"), r["projected_gpu"]
    out: list[Row] = []
    if m:
        sh = m["share"]
        out.append((f"one semi-online DPO cycle on the toy world ({m['candidates']} candidates, {m['scorer']} scorer, "
                    "policy: a 300-step toy SFT export unless --sdpo-init)",
                    f"{m['cycle_seconds']:.1f} s: generate {sh['generate']:.0%}, score {sh['score']:.0%}, "
                    f"train {sh['train']:.0%}",
                    f"v2-large on one GPU, projected: {sum(p['seconds'].values()) / 3600:.2f} h per cycle "
                    f"(generate {p['share']['generate']:.0%}, train {p['share']['train']:.0%})"))
    return out


def rows_codec(r: dict) -> list[Row]:
    t = r["tiny"]
    out = [(f"codec decoder, tiny released-layout files, {t['audio_s']:.0f} s of audio ({t['windows']} windows)",
            f"{t['decode_s']:.1f} s: real-time factor {t['rtf']:.2f}", "—")]
    g = r.get("grouped")
    if g:
        out.append((f"codec decoder, tiny files, {g['songs']} one-window songs grouped (`decode_batch`)",
                    f"{g['grouped_songs_per_s']:.3f} songs/s ({g['speedup']:.2f}×)",
                    f"one at a time: {g['one_at_a_time_songs_per_s']:.3f} songs/s; same audio bit for bit: "
                    f"{'yes' if g['bit_identical'] else 'no'}"))
    p = r.get("real_projection")
    if p:
        out.append(("codec decoder at the real size (random weights), projected from timed pieces",
                    f"~{p['window_s'] / 60:.1f} min per 40 s window (real-time factor ~{p['rtf_later_windows']:.0f})",
                    f"estimator layer {p['estimator_layer_s']:.2f} s per solver step, VAE {p['vae_chunk_s']:.1f} s per "
                    "128-frame chunk"))
    return out


def rows_encode(r: dict) -> list[Row]:
    t = r["tiny"]
    f, b = t["fp32"], t["bf16"]
    out = [(f"codec encoder, tiny released-layout files, a {t['audio_s']:.0f} s song with stems (3 rows)",
            f"{f['encode_s']:.1f} s fp32: real-time factor {f['rtf']:.3f}",
            f"bf16 {b['encode_s']:.1f} s, {b['agreement_with_fp32']:.1%} of the codes as fp32 (random weights)")]
    p = r.get("real_projection")
    if p:
        out.append((f"codec encoder at the real size (random weights), projected from timed pieces, a {p['song_s']:.0f} s "
                    "song", f"~{p['song_encode_s'] / 60:.1f} min (real-time factor ~{p['rtf']:.1f}, "
                    f"{p['songs_per_hour']:.1f} songs/hour)",
                    f"per 40 s chunk: conv front end {p['conv_front_end_s']:.1f} s, conformer block "
                    f"{p['conformer_block_s']:.2f} s ({p['conformer_blocks_per_chunk']} per chunk over the 3 rows)"))
    return out


def rows_per(r: dict) -> list[Row]:
    if r.get("skipped"):
        return [("PER throughput (offline Whisper ASR + G2P)", f"skipped: {r['skipped']}", "—")]
    return [(f"PER throughput, {r.get('model', 'Whisper')} via faster-whisper, {r.get('songs', '?')} songs",
             f"real-time factor {r['rtf']:.3f} ({r.get('audio_s', 0):.0f} s of audio in {r.get('seconds', 0):.1f} s)",
             f"corpus PER {r['corpus_per']:.3f} on matching lyrics" if "corpus_per" in r else "—")]


def benches(quick: bool, sdpo_init: str | None, engine_baseline: str | None = None) -> list[Bench]:
    q = quick
    return [
        Bench("train", ["eval/bench/bench_train.py", "--steps", "3" if q else "5"], rows_train),
        Bench("dpo", ["eval/bench/bench_dpo.py", "--repeats", "3" if q else "7"], rows_dpo),
        Bench("infer", ["eval/bench/bench_infer.py", *(["--skip-load"] if q else []), "--json", "{json}"], rows_infer,
              json_flag=True, timeout=1500),
        Bench("engine", ["eval/bench/bench_engine.py", "--toy-init", sdpo_init or "{sft_export}",
                         *(["--quick"] if q else []), *(["--baseline-src", engine_baseline] if engine_baseline else []),
                         "--json", "{json}"], rows_engine, json_flag=True, timeout=1800),
        Bench("strategies", ["eval/bench/bench_strategies.py", "--json", "{json}"], rows_strategies, json_flag=True),
        Bench("meta_init", ["eval/bench/bench_meta_init.py", "--legacy", "--export-legacy",
                            *(["--dim", "1024", "--ffn", "4096", "--heads", "8"] if q else []), "--json", "{json}"],
              rows_meta_init, json_flag=True, timeout=1800),
        Bench("lora_memory", ["eval/bench/bench_lora_memory.py", *(["--dim", "256"] if q else [])], rows_lora),
        Bench("sdpo", ["eval/bench/bench_sdpo.py", "--init", sdpo_init or "{sft_export}",
                       *(["--prompts", "60", "--sync-every", "10"] if q else [])], rows_sdpo),
        Bench("codec", ["eval/bench/bench_codec.py", *(["--songs", "2"] if q else []), "--json", "{json}"], rows_codec,
              json_flag=True),
        Bench("encode", ["eval/bench/bench_encode.py", *(["--seconds", "60"] if q else []), "--json", "{json}"],
              rows_encode, json_flag=True),
        Bench("per", ["eval/bench/bench_per.py", "--json", "{json}"], rows_per, json_flag=True),
    ]


# ----------------------------------------------------------------------------- running
def last_json(text: str) -> Any:
    """The last top-level JSON value printed (objects may span lines)."""
    dec = json.JSONDecoder()
    found, i = None, 0
    while True:
        j = min((k for k in (text.find("{", i), text.find("[", i)) if k >= 0), default=-1)
        if j < 0:
            return found
        try:
            found, end = dec.raw_decode(text, j)
            i = end
        except json.JSONDecodeError:
            i = j + 1


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return (f"{os.cpu_count()} × {cpu}, torch {torch.__version__}, "
            f"{os.environ.get('OMP_NUM_THREADS', '1')} thread(s)")


def make_sft_export(work: Path) -> Path:
    run = work / "sft"
    cmd = [sys.executable, "-m", "levo_train.cli", "recipe=sft", f"run_dir={run}", "trainer.max_steps=300",
           "trainer.val_check_interval=300", "trainer.enable_progress_bar=false", "logger=none"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    return run / "export"


def run_bench(b: Bench, out: Path, env: dict[str, str], fill: dict[str, str]) -> tuple[Any, float, str]:
    jpath = out / f"{b.name}.json"
    argv = [a.replace("{json}", str(jpath)).format(**fill) if "{" in a else a for a in b.command]
    script = REPO / argv[0]
    if not script.is_file():
        return {"skipped": f"{argv[0]} does not exist"}, 0.0, " ".join(argv)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=b.timeout)
    secs = time.perf_counter() - t0
    (out / f"{b.name}.log").write_text(p.stdout + "\n--- stderr\n" + p.stderr)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        if b.name == "per" and "skip" in p.stdout.lower() + p.stderr.lower():
            return {"skipped": tail}, secs, " ".join(argv)
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {tail}")
    res = json.loads(jpath.read_text()) if b.json_flag and jpath.is_file() else last_json(p.stdout)
    if not b.json_flag:
        jpath.write_text(json.dumps(res, indent=1))
    return res, secs, " ".join(argv)


def table(rows: list[tuple[str, str, str, str]], mach: str, date: str) -> str:
    head = [START, "", f"Regenerated by `OMP_NUM_THREADS=1 python eval/bench/run_all.py` on {date}: {mach}.", "",
            "| what | ours | reference | command |", "|---|---|---|---|"]
    body = [f"| {w} | {o} | {r} | `{c}` |" for w, o, r, c in rows]
    return "\n".join(head + body + ["", END])


def write_readme(text: str) -> None:
    s = README.read_text()
    if START in s and END in s:
        a, b = s.index(START), s.index(END) + len(END)
        s = s[:a] + text + s[b:]
    else:
        anchor = "## Performance\n"
        if anchor not in s:
            raise SystemExit("README.md has no '## Performance' section to put the table in")
        i = s.index(anchor) + len(anchor)
        s = s[:i] + "\n" + text + "\n" + s[i:]
    write_text_atomic(README, s)


def update_readme_rows(benches_run: list[Bench], rows: list[tuple[str, str, str, str]], date: str) -> int:
    """Replace, in the README's table, the rows of the benchmarks just run (``--only``): a row is a
    benchmark's when its command cell names the benchmark's script. The new rows take the place of the
    first old one (or go last), each with its date, the rest of the table untouched. Returns the rows written."""
    s = README.read_text()
    if START not in s or END not in s:
        raise SystemExit("README.md has no performance table to update; run without --only first")
    a, b = s.index(START), s.index(END)
    lines = s[a:b].split("\n")
    scripts = [x.command[0] for x in benches_run]
    mine = [i for i, line in enumerate(lines) if line.startswith("| ") and any(f"python {sc}" in line for sc in scripts)]
    new = [f"| {w} | {o} | {r} | `{c}` ({date}) |" for w, o, r, c in rows]
    at = mine[0] if mine else max(i for i, line in enumerate(lines) if line.startswith("|")) + 1
    kept = [line for i, line in enumerate(lines) if i not in mine]
    at -= sum(1 for i in mine if i < at)
    kept[at:at] = new
    write_text_atomic(README, s[:a] + "\n".join(kept) + s[b:])
    return len(new)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="benchmark names (default: all)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--sdpo-init", default=None, help="toy SFT export for the sDPO cycle (default: trained first)")
    ap.add_argument("--engine-baseline", default=None, help="a source tree of main before issue #22 (e.g. "
                    "`git archive 7db8be4 | tar -x -C DIR`) for the engine's batch-1 comparison (MAIN_TREE in the table)")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="rebuild the table from the JSON already in --out")
    a = ap.parse_args()
    date = dt.date.today().isoformat()
    out = a.out or REPO / "bench-results" / date
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), WANDB_MODE="offline")
    selected = [b for b in benches(a.quick, a.sdpo_init, a.engine_baseline) if a.only is None or b.name in a.only]
    unknown = set(a.only or []) - {b.name for b in benches(False, None)}
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}")
    fill: dict[str, str] = {}
    rows: list[tuple[str, str, str, str]] = []
    t_all = time.perf_counter()
    if a.render_only:
        for b in selected:
            res = json.loads((out / f"{b.name}.json").read_text())
            cmd = re.sub(r"--json \S+", "", " ".join(b.command)).replace("{sft_export}", "SFT_EXPORT").strip()
            rows += [(w, o, r, f"OMP_NUM_THREADS=1 python {cmd}") for w, o, r in b.rows(res)]
        selected = []
    with tempfile.TemporaryDirectory() as tmp:
        if any(b.name in ("sdpo", "engine") for b in selected) and not a.sdpo_init:
            print("run_all: training a 300-step toy SFT export for the sDPO cycle and the engine ...", file=sys.stderr, flush=True)
            fill["sft_export"] = str(make_sft_export(Path(tmp)))
        for b in selected:
            print(f"run_all: {b.name} ...", file=sys.stderr, flush=True)
            res, secs, cmd = run_bench(b, out, env, fill)
            cmd = re.sub(r"--json \S+", "", cmd).replace(fill.get("sft_export", "\0"), "SFT_EXPORT")
            cmd = cmd.replace(a.sdpo_init or "\0", "SFT_EXPORT").replace(a.engine_baseline or "\0", "MAIN_TREE").strip()
            got = b.rows(res) if not (isinstance(res, dict) and res.get("skipped")) or b.name == "per" else [
                (b.name, f"skipped: {res['skipped']}", "—")]
            rows += [(w, o, r, f"OMP_NUM_THREADS=1 python {cmd}") for w, o, r in got]
            print(f"run_all: {b.name} done in {secs:.0f} s", file=sys.stderr, flush=True)
    text = table(rows, machine(), date)
    (out / "table.md").write_text(text + "\n")
    print(text)
    if a.quick:  # a smoke run: figures not for the README
        pass
    elif not a.no_readme and a.only is None:
        write_readme(text)
        print(f"run_all: README.md table regenerated ({len(rows)} rows)", file=sys.stderr)
    elif not a.no_readme and rows:
        n = update_readme_rows([b for b in benches(a.quick, a.sdpo_init) if b.name in a.only], rows, date)
        print(f"run_all: README.md table: the rows of {', '.join(a.only)} replaced ({n} rows)", file=sys.stderr)
    print(f"run_all: {time.perf_counter() - t_all:.0f} s in all; results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
