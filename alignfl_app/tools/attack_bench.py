"""What each attack on the server costs: five silos, one of them the attacker, every figure measured.

    alignfl attack-bench [--experiment NAME] [--set KEY=VALUE ...] [--rounds 2] [--attacks label-swap ...]
                         [--attacker 1] [--out results/attack-bench]

The silos train in this process (their own seeded records of the run's dataset, in a throw-away silos folder) and
their replies go to the server core exactly as the ServerApp hands them over, with the run's judge and label
check; every round the attacker (silo ``--attacker``) sends its attack instead of its own generator:

- ``label-swap``: its own decoder with its class names swapped;
- ``wrong-class``: a decoder it trained on another silo's classes, sent under its own class names;
- ``blank``: a decoder whose weights are all zero;
- ``copy``: another silo's decoder with 1% noise on its weights, under its own name and classes;
- ``replay``: the bytes of its first generator, every round;
- ``backdoor``: its own decoder with a bright 4x4 patch in the corner of every sample (the final layer's bias),
  which teaches the global model "patch means my first class".

Printed and written (``attack-bench.json``, ``attack-bench.md``): what the server did with the attacker's replies,
the global accuracy on the real test set, the balanced accuracy on the honest silos' classes and its change
against the run without an attacker, and for the backdoor the share of patched test images of the honest silos'
classes the global model assigns to the attacker's first class (minus the same share without the attacker).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignfl_app.config import ConfigError, RunConfig, parse_node_config, parse_run_config
from alignfl_app.contract.descriptor import GeneratorDescriptor
from alignfl_app.contract.replies import ReplyRejected
from alignfl_app.data.datasets import global_test_set
from alignfl_app.experiments import add_overrides_option, app_defaults, experiment_overrides, parse_assignments
from alignfl_app.models.global_model import GlobalModel
from alignfl_app.server.core import AlignFLServer, TrainReply
from alignfl_app.server.metrics import RunRecorder
from alignfl_app.server.store import GeneratorStore
from alignfl_app.server.validation import label_validator
from alignfl_app.silo.core import Silo

BENCH = {
    "max-per-class": 600,
    "local-epochs": 5,
    "local-min-steps": 200,
    "silo-architectures": "mlp",  # the backdoor writes its patch into an mlp decoder's final bias
    "outliers-per-silo": 0,
    "synthetic-per-silo": 1000,
    "server-epochs": 3,
    "sample-grid-per-silo": 0,
}
"""A small federation whose generators draw their digits (about a minute to train on two cores)."""
PATCH = 4  # the backdoor's patch: PATCH x PATCH pixels in the bottom-right corner
Generator = tuple[GeneratorDescriptor, dict[str, np.ndarray], dict[str, Any]]  # descriptor, decoder, metrics


def train_silos(
    cfg: RunConfig, rounds: int, root: Path, extra: dict[str, dict[str, Any]]
) -> dict[int | str, list[Generator]]:
    """Each silo's generator of every round, trained in this process in its own folder under ``root``; ``extra``
    adds silos (key: a label of our own) with node-config entries of their own (another silo's classes)."""
    nodes: dict[int | str, dict[str, Any]] = {s: {"partition-id": s} for s in range(cfg.data.num_silos)} | extra
    out: dict[int | str, list[Generator]] = {}
    previous_root = os.environ.get("ALIGNFL_SILOS_ROOT")
    try:
        for key, node in nodes.items():
            os.environ["ALIGNFL_SILOS_ROOT"] = str(root / f"silos-{key}")
            silo, state, out[key] = Silo(cfg, parse_node_config(node)), None, []
            for rnd in range(1, rounds + 1):
                outcome = silo.train_round("attack-bench", rnd, state)
                state = outcome.state
                decoder = {k: v.numpy() for k, v in outcome.decoder_state.items()}
                out[key].append((outcome.descriptor, decoder, outcome.metrics.record()))
            print(f"[attack-bench] silo {key} trained ({rounds} rounds)", flush=True)
    finally:
        if previous_root is None:
            os.environ.pop("ALIGNFL_SILOS_ROOT", None)
        else:
            os.environ["ALIGNFL_SILOS_ROOT"] = previous_root
    return out


def patched(images: torch.Tensor) -> torch.Tensor:
    x = images.clone()
    x[..., -PATCH:, -PATCH:] = 1.0
    return x


def backdoored(desc: GeneratorDescriptor, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoder with its patch pixels' final logits raised far above any sample's: every sample carries it."""
    c, h, w = desc.image_shape
    bias = next(k for k in reversed(list(state)) if k.endswith("bias") and state[k].shape == (c * h * w,))
    mask = patched(torch.zeros(1, c, h, w)).flatten().numpy() > 0
    logits = state[bias].copy()
    logits[mask] = 50.0
    return {**state, bias: logits}


def attacks(silos: dict[int | str, list[Generator]], attacker: int, victim: int, rnd: int) -> dict[str, Generator]:
    """The attacker's reply of round ``rnd`` for each attack (``victim``: the silo copied)."""
    desc, state, metrics = silos[attacker][rnd - 1]
    own = {"silo": desc.silo, "classes": desc.classes}
    stolen_desc, stolen_state, _ = silos["wrong-class"][rnd - 1]
    copied_desc, copied_state, _ = silos[victim][rnd - 1]
    noise = np.random.default_rng(rnd)
    return {
        "label-swap": (desc.model_copy(update={"classes": tuple(reversed(desc.classes))}), state, metrics),
        "wrong-class": (stolen_desc.model_copy(update=own), stolen_state, metrics),
        "blank": (desc, {k: np.zeros_like(v) for k, v in state.items()}, metrics),
        "copy": (
            copied_desc.model_copy(update=own),
            {
                k: (v + 0.01 * np.abs(v).mean() * noise.standard_normal(v.shape)).astype(v.dtype)
                for k, v in copied_state.items()
            },
            metrics,
        ),
        "replay": silos[attacker][0],
        "backdoor": (desc, backdoored(desc, state), metrics),
    }


ATTACKS = ("label-swap", "wrong-class", "blank", "copy", "replay", "backdoor")


def run_scenario(
    cfg: RunConfig,
    folder: Path,
    replies: Callable[[int], dict[int, Generator]],
    test: tuple[torch.Tensor, torch.Tensor],
    target: int,
) -> dict[str, Any]:
    """``rounds`` rounds of the server core on the given replies (node id = silo index + 1000); its verdicts on
    every reply and the final global model's figures."""
    model = GlobalModel.from_config(cfg)
    recorder = RunRecorder(folder / "run", cfg.flat())
    labels, _ = label_validator(cfg, model.encode)
    core = AlignFLServer(cfg, GeneratorStore(folder / "generators"), model, recorder, labels)
    verdicts: dict[int, list[str]] = {}
    for rnd in range(1, cfg.run.num_server_rounds + 1):
        round_replies = replies(rnd)
        core.nodes_to_ask(rnd, [1000 + s for s in round_replies])
        accepted, rejected = 0, []
        for silo, (desc, state, metrics) in round_replies.items():
            nbytes = sum(v.nbytes for v in state.values())
            try:
                core.accept(rnd, 1000 + silo, TrainReply(desc.model_dump_json(), state, metrics, nbytes))
                record = core.recorder.silo(rnd, desc.silo)
                verdict = f"stale (replay of round {record['replay-of-round']})" if "replay-of-round" in record else ""
                verdicts.setdefault(silo, []).append(verdict or "accepted")
                accepted += 1
            except ReplyRejected as exc:
                rejected.append(f"node {1000 + silo}: {exc}")
                quarantined = desc.silo in core.standing.quarantined
                verdicts.setdefault(silo, []).append(("quarantined: " if quarantined else "refused: ") + str(exc))
        core.finish_train_round(rnd, accepted, rejected, {1000 + s for s in round_replies})
    x, y = test
    figures = model.evaluate(x, y)
    return {
        "verdicts": verdicts,
        "accuracy": figures["accuracy"],
        "per-class": figures["per-class-accuracy"],
        "patched-to-target": assigned_to(model, patched(x[y != target]), target),
    }


def assigned_to(model: GlobalModel, x: torch.Tensor, target: int) -> float:
    """Share of ``x`` the model assigns to class ``target`` (its accuracy were they all of that class)."""
    return float(model.evaluate(x, torch.full((len(x),), target, dtype=torch.long))["accuracy"])


def balanced(per_class: list[float], classes: list[int]) -> float:
    values = [per_class[c] for c in classes if not np.isnan(per_class[c])]
    return float(np.mean(values)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignfl attack-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="", help="base experiment (name in conf/experiments/ or TOML file)")
    add_overrides_option(parser, "run-config overrides (after the bench's own small federation)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    parser.add_argument("--attacker", type=int, default=1, help="the attacking silo's index")
    parser.add_argument("--out", default="results/attack-bench")
    args = parser.parse_args(argv)
    try:
        raw = app_defaults() | (experiment_overrides(args.experiment) if args.experiment else {}) | BENCH
        cfg = parse_run_config(raw | parse_assignments(args.set) | {"num-server-rounds": args.rounds})
        groups = cfg.data.silo_classes
        if not 0 <= args.attacker < len(groups) or len(groups) < 2:
            raise ConfigError(f"--attacker {args.attacker}: the run has silos 0..{len(groups) - 1} (at least two)")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    attacker, victim = args.attacker, (args.attacker + 2) % len(groups)
    if victim == attacker:
        victim = (attacker + 1) % len(groups)
    attacker_classes = [int(c) for c in cfg.data.silo_class_ids(attacker)]
    honest_classes = [c for c in range(len(cfg.data.class_names)) if c not in attacker_classes]
    target = attacker_classes[0]
    other = ",".join(str(c) for c in cfg.data.silo_class_ids(victim))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.server.threads)
    test = global_test_set(cfg)
    assert test is not None  # built-in datasets only: parse_run_config refuses folders without global-test-dir
    with tempfile.TemporaryDirectory(prefix="attack-bench-") as tmp:
        extra = {"wrong-class": {"partition-id": attacker, "classes": other}}
        silos = train_silos(cfg, args.rounds, Path(tmp), extra)
        honest_replies = {s: silos[s] for s in range(len(groups))}
        results = {}
        for name in ["honest", *args.attacks]:

            def replies(rnd: int, name: str = name) -> dict[int, Generator]:
                chosen = {s: honest_replies[s][rnd - 1] for s in honest_replies}
                if name != "honest":
                    chosen[attacker] = attacks(silos, attacker, victim, rnd)[name]
                return chosen

            results[name] = run_scenario(cfg, Path(tmp) / name, replies, test, target)
            print(f"[attack-bench] {name}: accuracy {results[name]['accuracy']:.4f}", flush=True)
    honest = results["honest"]
    rows = []
    for name, r in results.items():
        others = balanced(r["per-class"], honest_classes)
        rows.append(
            {
                "attack": name,
                "attacker-verdicts": r["verdicts"].get(attacker, []),
                "accuracy": r["accuracy"],
                "honest-classes": others,
                "honest-classes-change": others - balanced(honest["per-class"], honest_classes),
                "patched-to-target": r["patched-to-target"],
                "backdoor-success": r["patched-to-target"] - honest["patched-to-target"],
            }
        )
    report = {"config": cfg.flat(), "attacker": attacker, "target": target, "rows": rows}
    (out / "attack-bench.json").write_text(json.dumps(report, indent=2, default=str))
    lines = [
        f"Attacker: silo {attacker} (classes {attacker_classes}); backdoor target class {target}; "
        f"{args.rounds} rounds; {cfg.data.dataset}",
        "",
        "| attack | what the server did with the attacker's replies | accuracy | honest silos' classes | change "
        "| backdoor success |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdicts = "; ".join(dict.fromkeys(v[:140] for v in r["attacker-verdicts"]))
        lines.append(
            f"| {r['attack']} | {verdicts} | {r['accuracy']:.4f} | {r['honest-classes']:.4f} "
            f"| {r['honest-classes-change']:+.4f} | {r['backdoor-success']:+.3f} |"
        )
    (out / "attack-bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"[attack-bench] wrote {out}/attack-bench.json, attack-bench.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
