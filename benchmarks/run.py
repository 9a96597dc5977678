"""`make bench`: the benchmarks on the available device from the embedded data (data/nuclei), one
table of figure, target and status, JSON per benchmark in bench-out/.

Memory benchmarks run in child processes so each peak is its own. Larger data: each benchmark
module takes --root (e.g. `python -m benchmarks.train_vs_loop --root DATASETS/camvid
--config configs/camvid.yaml`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import data_path, predict_throughput, train_vs_loop
from benchmarks.common import ROOT, write_result


def child(module: str, out: Path, name: str, *args: str) -> dict:
    subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--out", str(out), *args], check=True,
                   stdout=subprocess.DEVNULL, cwd=ROOT)
    return json.loads((out / f"{name}.json").read_text())


def status(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--device", default="auto")
    p.add_argument("--only", default="data,predict,train,plan,huge,raster,windowed,volume,soak,gpusync",
                   help="comma-separated subset")
    p.add_argument("--steps", type=int, default=300, help="training steps of the train comparison")
    p.add_argument("--plan-budget", default="3m", help="budget of the zero-config plan against configs/")
    p.add_argument("--raster-size", type=int, default=8192, help="side of the huge GeoTIFF (30000 in the notes)")
    p.add_argument("--volume-depth", type=int, default=300, help="slices of the 512 x 512 int16 volume")
    a = p.parse_args()
    out = a.out.resolve()
    only = set(a.only.split(","))
    rows: list[tuple[str, str, str, str]] = []
    if "data" in only:
        r = data_path.run(ROOT / "data" / "nuclei", ROOT / "configs" / "nuclei-sigmoid.yaml")
        write_result(out, "data_path_nuclei", r)
        per = r["cached"]["per_worker_process"]
        rows.append(("loader samples/s per worker, crop 256", f"{per:.0f}", ">= 150", status(per >= 150)))
    if "predict" in only:
        r = predict_throughput.run(out, a.device)
        write_result(out, "predict_throughput", r)
        rows.append(("predict vs bare model(batch) loop", f"{r['ratio']:.3f}", ">= 0.90", status(r["ratio"] >= 0.9)))
        rows.append(("TTA cost (x one pass)", f"{r['tta_cost']:.2f}", "<= 4.2", status(r["tta_cost"] <= 4.2)))
    if "train" in only:
        r = train_vs_loop.run(ROOT / "data" / "nuclei", ROOT / "configs" / "nuclei-sigmoid.yaml", out, a.steps)
        write_result(out, "train_vs_loop_nuclei", r)
        rows.append((f"segkit train / minimal loop, {r['steps']} steps (wall)", f"{r['ratio']:.3f}", "<= 1.15",
                     status(r["ratio"] <= 1.15)))
        rows.append(("  validation Dice segkit / loop", f"{r['segkit_val_dice']:.3f} / {r['loop_val_dice']:.3f}",
                     ">= loop", status(r["segkit_val_dice"] >= r["loop_val_dice"])))
    if "plan" in only:
        r = child("plan_vs_config", out, "plan_vs_config", "--budget", a.plan_budget)["rows"][0]
        plan, hand = r["plan"], r["config_run"]
        rows.append((f"zero-config plan / configs/nuclei-sigmoid.yaml, {a.plan_budget} (held-out fg Dice)",
                     f"{plan['test_fg_dice']:.3f} / {hand['test_fg_dice']:.3f}", ">= config",
                     status(plan["test_fg_dice"] >= hand["test_fg_dice"])))
        rows.append(("  the plan's wall time against its budget", f"{plan['vs_budget']:+.1%}", "within +-10 %",
                     status(abs(plan["vs_budget"]) <= 0.10)))
    if "huge" in only:
        r = child("huge_image", out, "huge_image_8192", "--size", "8192", "--device", a.device)
        rows.append(("predict 8192^2 RGB in memory, peak above model", f"{r['peak_rss_mib'] - r['rss_before_image_mib']:.0f} MiB",
                     f"<= {r['target_peak_mib'] - r['rss_before_image_mib']:.0f} MiB", status(r["meets_target"])))
    if "raster" in only:
        size = str(a.raster_size)
        r = child("huge_raster", out, f"huge_raster_{size}_1b", "--size", size, "--device", a.device)
        rows.append((f"predict {size}^2 GeoTIFF from disk, working memory", f"{r.get('working_mib', 0):.0f} MiB",
                     f"<= {r.get('bound_mib', 0):.0f} MiB (band bound)", status(bool(r.get("meets_bound")))))
    if "windowed" in only:
        r = child("windowed_train", out, "windowed_train_4096_geotiff", "--size", "4096", "--count", "2")
        rows.append(("training crops from 4096^2 tiles, windowed vs whole", f"{r.get('speedup', 0):.1f}x", "> 1",
                     status(r.get("speedup", 0) > 1)))
    if "volume" in only:
        depth = str(a.volume_depth)
        r = child("volume_predict", out, f"volume_predict_512x{depth}", "--depth", depth, "--device", a.device)
        rows.append((f"predict a 512x512x{depth} int16 volume (resnet18)",
                     f"{r['seconds_per_volume']:.0f} s/volume", "(reported)", "-"))
        rows.append(("  its peak memory above the loaded model", f"{r['peak_rss_mib'] - r['rss_before_mib']:.0f} MiB",
                     f"<= {r['target_peak_mib'] - r['rss_before_mib']:.0f} MiB", status(r["meets_target"])))
    if "soak" in only:
        r = child("soak", out, "soak", "--device", a.device)
        pr, tr = r["predict"], r["train"]
        target = f"growth <= {r['target_growth_mib']:.0f} MiB"
        rows.append((f"predict {pr['images']} 64^2 images: RSS after 1000 / {pr['last_sampled_images']}",
                     f"{pr['rss_after_1000_mib']:.0f} / {pr['rss_after_last_mib']:.0f} MiB, "
                     f"median {pr['growth_mib']:+.1f}", target, status(pr["meets_target"])))
        first, last = tr["early_epochs"]
        rows.append((f"train {tr['epochs']} short epochs: lowest RSS, epochs {first}-{last} / last 5",
                     f"{tr['lowest_early_mib']:.0f} / {tr['lowest_late_mib']:.0f} MiB, "
                     f"{tr['growth_mib']:+.1f}", target, status(tr["meets_target"])))
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if "gpusync" in only:
        if device == "cuda":
            subprocess.run([sys.executable, "-m", "benchmarks.gpu_sync", "--out", str(out)], stdout=subprocess.DEVNULL,
                           cwd=ROOT)  # exits 1 when it finds a sync: the row says so
            r = json.loads((out / "gpu_sync.json").read_text())
            for part in ("train", "predict"):
                found = r[part]["sync_found"]
                rows.append((f"host-device syncs in a {part} step", "none" if not found else found[:22], "none",
                             status(not found)))
                rows.append((f"  {part} images/s, GPU utilisation", f"{r[part]['images_per_s']:.0f}, "
                             f"{r[part]['gpu_utilisation'] or 0:.0f} %", "(reported)", "-"))
        else:
            rows.append(("host-device syncs (benchmarks.gpu_sync)", "needs CUDA", "none", "-"))
    width = max(len(r[0]) for r in rows)
    print(f"\nsegkit benchmarks on {device} (JSON in {out})")
    print("\n".join(f"{name:<{width}}  {value:<22}  {target:<30}  {st}" for name, value, target, st in rows))


if __name__ == "__main__":
    main()
