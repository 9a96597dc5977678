"""Zero-config training (`segkit train ROOT --budget B`) against the hand-written configs in configs/ at the
same wall time (the config run gets `train.time_limit` = B).

Both runs train on the same images and each picks its best/ on its own validation share of them; each best/
is then scored on held-out images neither run has seen (the dataset's labelled test split, else its val/
split, else a seeded 20 %: `benchmarks.holdout`) with `segkit evaluate --split test --exclude-background`
(mean Dice over the classes that are not background, so a 1-class sigmoid config and a 2-class softmax plan
are compared on the same thing). Reported: both scores, both wall times, and the plan's time against its
budget (goal: within +-10 %).

    python -m benchmarks.plan_vs_config                        # embedded data/nuclei, configs/nuclei-sigmoid.yaml
    python -m benchmarks.plan_vs_config --budget 5m \\
        --pair DATASETS/isbi2012-membrane:configs/isbi2012-membrane.yaml \\
        --pair DATASETS/isic2018-multilabel-mini:configs/isic2018-multilabel-mini.yaml
    python -m benchmarks.plan_vs_config --pair DATASETS/camvid:configs/camvid.yaml \\
        --declare ignore_index --declare classes     # what the files cannot tell, declared as a user would
    python -m benchmarks.plan_vs_config --seed 0 --seed 1 --seed 2    # each pair once per seed, and the means

`--declare KEY` gives the plan run `--set data.KEY=...` with the config's value, where the config sets it.
`--plans DIR` plans each pair and seed once (`segkit plan`, kept in DIR) and trains that plan.yaml, so a change
to training is measured on the same plans: run the benchmark from each version with the same DIR.
`--seed S` gives both runs `train.seed=S` (the seed of their weights, crops and validation share; the held-out
images stay the same): one 3-minute run moves by several hundredths, so a single seed says little.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ROOT, write_result
from benchmarks.holdout import held_out
from segkit.config import load_config
from segkit.plan import parse_budget


def _run(cmd: list[str]) -> float:
    began = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - began


def _score(run_dir: Path, root: Path, out: Path) -> float:
    scores = out / f"{run_dir.name}.scores.json"
    classes = json.loads((run_dir / "best" / "model.json").read_text())["classes"]
    background = ["--exclude-background"] if "background" in [c.lower() for c in classes] else []
    _run([sys.executable, "-m", "cli", "evaluate", str(run_dir / "best"), str(root), "--split", "test",
          *background, "--json", str(scores), "--device", "cpu", "--no-progress"])
    return float(json.loads(scores.read_text())["mean"]["dice"])


def _plan_run(view: Path, budget: str, run_dir: Path, seed: int, declared: list[str], plans: Path | None,
              name: str) -> float:
    """The plan's run: `segkit train ROOT --budget` in one process, or (with `plans`) `segkit train` of the
    plan.yaml `segkit plan` wrote there for this data and seed, planned once and kept, so two code versions can
    train the same plan (their wall time: planning, once measured, plus training)."""
    declares = [a for d in declared for a in ("--set", d)]
    common = ["--out", str(run_dir), "--device", "cpu", "--no-progress", "--set", f"train.seed={seed}"]
    if plans is None:
        return _run([sys.executable, "-m", "cli", "train", str(view), "--budget", budget, *common, *declares])
    plan, planning = plans / f"{name}-{budget}-s{seed}.yaml", plans / f"{name}-{budget}-s{seed}.seconds"
    if not plan.is_file():
        plans.mkdir(parents=True, exist_ok=True)
        planning.write_text(str(_run([sys.executable, "-m", "cli", "plan", str(view), "--budget", budget,
                                      "--out", str(plan), "--device", "cpu", "--no-progress", *declares])))
    return float(planning.read_text()) + _run([sys.executable, "-m", "cli", "train", str(plan), *common])


def compare(root: Path, config: Path, budget: str, out: Path, declare: list[str], seed: int,
            plans: Path | None = None) -> dict:
    seconds = parse_budget(budget)
    data = load_config(config, [f"data.root={root}"]).data
    declared = [f"data.{k}={json.dumps(getattr(data, k))}" for k in declare
                if k in data.model_fields_set and getattr(data, k) is not None]
    plan_dir, hand_dir = out / f"{root.name}-s{seed}-plan", out / f"{root.name}-s{seed}-config"
    for d in (plan_dir, hand_dir):
        shutil.rmtree(d, ignore_errors=True)
    view, held = held_out(root, data, out / f"{root.name}-view")
    plan_s = _plan_run(view, budget, plan_dir, seed, declared, plans, root.name)
    hand_s = _run([sys.executable, "-m", "cli", "train", str(config), "--out", str(hand_dir), "--device", "cpu",
                   "--no-progress", "--set", f"data.root={view}", "--set", f"train.time_limit={seconds}",
                   "--set", f"train.seed={seed}"])
    planned = json.loads((plan_dir / "best" / "model.json").read_text())["plan"]
    return {"root": str(root), "config": str(config), "seed": seed, "budget_s": seconds, "declared": declared,
            "held_out": held,
            "plan": {"seconds": round(plan_s, 1), "vs_budget": round(plan_s / seconds - 1, 4),
                     "predicted_s": round(planned["predicted_s"], 1), "test_fg_dice": _score(plan_dir, view, out)},
            "config_run": {"seconds": round(hand_s, 1), "test_fg_dice": _score(hand_dir, view, out)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="3m")
    p.add_argument("--pair", action="append", help="ROOT:CONFIG (repeatable)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    p.add_argument("--declare", action="append", default=[], metavar="KEY",
                   help="pass the config's data.KEY to the plan run as --set (repeatable), e.g. ignore_index")
    p.add_argument("--seed", action="append", type=int, metavar="S",
                   help="run each pair with train.seed=S (repeatable; default 0)")
    p.add_argument("--plans", type=Path, metavar="DIR",
                   help="plan each pair and seed once into DIR (kept) and train that plan.yaml: an A/B of two code "
                        "versions on the same plans")
    a = p.parse_args()
    pairs = a.pair or [f"{ROOT / 'data' / 'nuclei'}:{ROOT / 'configs' / 'nuclei-sigmoid.yaml'}"]
    rows: list[dict] = []
    partial = a.out / "plan_vs_config.partial.json"  # hours of runs: each row kept as it lands
    partial.parent.mkdir(parents=True, exist_ok=True)
    for root, config in (pair.rsplit(":", 1) for pair in pairs):
        for seed in a.seed or [0]:
            rows.append(compare(Path(root), Path(config), a.budget, a.out / "plan_vs_config", a.declare, seed,
                                a.plans))
            partial.write_text(json.dumps(rows, indent=2))
    write_result(a.out, "plan_vs_config", {"benchmark": "zero-config plan vs hand-written config, same wall time",
                                           "rows": rows, "means": means(rows)})


def means(rows: list[dict]) -> list[dict]:
    """Per pair, the seeds' held-out scores, their means and the plan's widest miss of its budget."""
    pairs: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        pairs.setdefault((r["root"], r["config"]), []).append(r)
    out = []
    for (root, config), rs in pairs.items():
        plan, hand = [r["plan"]["test_fg_dice"] for r in rs], [r["config_run"]["test_fg_dice"] for r in rs]
        out.append({"root": root, "config": config, "seeds": [r["seed"] for r in rs], "plan": plan, "config_run": hand,
                    "plan_mean": round(sum(plan) / len(plan), 4), "config_mean": round(sum(hand) / len(hand), 4),
                    "plan_widest_vs_budget": max((r["plan"]["vs_budget"] for r in rs), key=abs)})
    return out


if __name__ == "__main__":
    main()
