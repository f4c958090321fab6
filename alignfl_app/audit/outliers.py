"""What a silo's shared decoder leaks about its outliers (run on the silo: it needs the raw records).

All distances are Euclidean in pixel space ([0, 1] images, 784 values).

* **mapping rate**: share of the silo's training outliers ``x_o`` whose encode-decode
  ``r = sigmoid(D(mu(x_o, y), y))`` (posterior mean, the outlier's own label) lies nearer to some typical
  (non-outlier) training record of the silo than to ``x_o`` itself: ``min_j |r - x_j| < |r - x_o|``.
  1.0: every outlier is mapped onto typical data; 0.0: every outlier is reproduced.
* **leakage rate**: share of ``n`` samples of the shared decoder (prior latents, the silo's labels
  balanced) whose nearest training record is an outlier; compare it with the **outlier share**
  (outliers / training records): a decoder that ignores outliers scores below the share, one that
  memorises them scores far above it.
  The leakage rate also counts samples that are merely outlier-*like* (blurry, ink-heavy samples land
  nearest a Fashion-MNIST item whether or not the decoder saw it), hence:
* **member-nearer rate** (a distance-to-closest-record test against a holdout): share of the decoder
  samples that lie nearer to the silo's training outliers than to as many held-out outliers of the same
  source (never trained on). 0.5: the decoder knows no more about its own outliers than about fresh
  ones; towards 1.0: its samples reproduce its members.
* **MIA AUC**: a decoder-only membership-inference attack (what the server could run): score a
  candidate by minus its distance to the nearest decoder sample; members are the training outliers,
  non-members the held-out outliers of the same source. AUC 0.5: no signal; 1.0: perfect inference.

Only these numbers leave the silo (reply metrics -> summary.json); the figure, which shows raw outliers,
is written on the silo's side. The decoder-only numbers can be recomputed later from a run's stored
generators where the silo's data is (``alignfl audit --run <run folder>``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from alignfl_app.devices import device_of
from alignfl_app.models.vae import GeneratorSet, one_hot
from alignfl_app.seeds import audit_seed
from alignfl_app.training import to_local_labels


@dataclass
class OutlierAudit:
    mapping_rate: float | None  # needs the encoder: None when only the shared decoder is audited
    leakage_rate: float
    member_nearer_rate: float
    outlier_share: float
    mia_auc: float
    num_outliers: int
    num_samples: int

    def metrics(self) -> dict[str, float | int]:
        m = {
            "audit-leakage-rate": self.leakage_rate,
            "audit-member-nearer-rate": self.member_nearer_rate,
            "audit-outlier-share": self.outlier_share,
            "audit-mia-auc": self.mia_auc,
            "audit-num-outliers": self.num_outliers,
            "audit-num-samples": self.num_samples,
        }
        if self.mapping_rate is not None:
            m["audit-mapping-rate"] = self.mapping_rate
        return {k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}  # NaN: not measurable


def _nearest(queries: torch.Tensor, refs: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query's nearest reference row."""
    q, r = queries.flatten(1), refs.flatten(1)
    dists, idx = [], []
    for i in range(0, len(q), chunk):
        d = torch.cdist(q[i : i + chunk], r)
        m = d.min(dim=1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists), torch.cat(idx)


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties count half (Mann-Whitney)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


@torch.no_grad()
def reconstruct(generators: GeneratorSet, x: torch.Tensor, y: torch.Tensor, label_set: tuple[int, ...]) -> torch.Tensor:
    generators.eval()
    return torch.sigmoid(generators.reconstruct(x, to_local_labels(y, label_set)))


@torch.no_grad()
def decoder_samples(decoder: nn.Module, label_set: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """What the server can make of the shared decoder: prior latents, the silo's labels balanced."""
    g = torch.Generator().manual_seed(seed)
    cond = decoder.cond_dim
    local = torch.arange(n) % max(len(label_set), 1)
    z = torch.randn(n, decoder.spec.latent_dim, generator=g)
    decoder.eval()
    device = device_of(decoder)
    return torch.sigmoid(decoder(z.to(device), one_hot(local.to(device), cond) if cond else None))


def audit_decoder(
    decoder: nn.Module,
    x: torch.Tensor,
    is_outlier: torch.Tensor,
    heldout: torch.Tensor,
    label_set: tuple[int, ...],
    num_samples: int = 2000,
    seed: int = 0,
) -> OutlierAudit:
    """The numbers that need only the shared decoder and the silo's records (no mapping rate)."""
    out_x, typical = x[is_outlier], x[~is_outlier]
    if len(out_x) == 0 or len(typical) == 0:
        raise ValueError("the outlier audit needs a silo with both outliers and typical records")
    samples = decoder_samples(decoder, label_set, num_samples, seed)
    _, nn_idx = _nearest(samples, x)
    leakage = float(is_outlier[nn_idx].float().mean())
    nearer = float("nan")
    k = min(len(out_x), len(heldout))  # equal numbers: the nearest of more candidates is nearer by chance
    if k:
        nearer = float((_nearest(samples, out_x[:k])[0] < _nearest(samples, heldout[:k])[0]).float().mean())
    member_score = -_nearest(out_x, samples)[0]
    nonmember_score = -_nearest(heldout, samples)[0]
    return OutlierAudit(
        mapping_rate=None,
        leakage_rate=leakage,
        member_nearer_rate=nearer,
        outlier_share=float(is_outlier.float().mean()),
        mia_auc=auc(member_score, nonmember_score),
        num_outliers=len(out_x),
        num_samples=num_samples,
    )


def audit_outliers(
    vae: GeneratorSet,
    x: torch.Tensor,
    y: torch.Tensor,
    is_outlier: torch.Tensor,
    heldout: torch.Tensor,
    label_set: tuple[int, ...],
    num_samples: int = 2000,
    seed: int = 0,
) -> OutlierAudit:
    """Every number above for one silo (needs at least one outlier and one typical record)."""
    result = audit_decoder(vae.decoder, x, is_outlier, heldout, label_set, num_samples, seed)
    out_x, out_y, typical = x[is_outlier], y[is_outlier], x[~is_outlier]
    rec = reconstruct(vae, out_x, out_y, label_set)
    d_typical, _ = _nearest(rec, typical)
    d_self = (rec - out_x).flatten(1).norm(dim=1)
    result.mapping_rate = float((d_typical < d_self).float().mean())
    return result


def save_audit_figure(
    vae: GeneratorSet,
    x: torch.Tensor,
    y: torch.Tensor,
    is_outlier: torch.Tensor,
    label_set: tuple[int, ...],
    path: Path,
    k: int = 8,
    seed: int = 0,
) -> Path:
    """Rows: outliers; their encode-decode; the decoder sample nearest to each outlier (silo-side file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_x, out_y = x[is_outlier][:k], y[is_outlier][:k]
    rec = reconstruct(vae, out_x, out_y, label_set)
    samples = decoder_samples(vae.decoder, label_set, 2000, seed)
    _, idx = _nearest(out_x, samples)
    rows = [("outlier", out_x), ("encode-decode", rec), ("nearest decoder sample", samples[idx])]
    fig, axes = plt.subplots(3, len(out_x), figsize=(1.2 * len(out_x), 4.0), squeeze=False)
    for r, (title, imgs) in enumerate(rows):
        for c in range(len(out_x)):
            ax = axes[r][c]
            ax.imshow(imgs[c, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def audit_run(run_dir: Path, data_root: str = "") -> dict[str, dict[str, float | int]]:
    """Decoder-only audit of a finished simulation run, from its stored generators and summary config.

    Rebuilds each outlier silo's records from the run config (partitions are deterministic), so it runs
    where the silos' data is; uses the seed and sample count of the in-run audit, so its numbers match it.
    """
    from alignfl_app.config import parse_run_config
    from alignfl_app.data.datasets import federation_silo_data
    from alignfl_app.server.store import GeneratorStore

    summary = json.loads((run_dir / "summary.json").read_text())
    config = {**summary["config"], **({"data-root": data_root} if data_root else {})}
    cfg = parse_run_config(config)
    store = GeneratorStore(run_dir / "generators")
    out = {}
    for k in cfg.data.outlier_silos:
        name = f"silo-{k}"
        if name not in store.silos():
            continue
        desc, decoder = store.load_decoder(name)
        data = federation_silo_data(cfg, k)
        result = audit_decoder(
            decoder,
            data.x_train,
            data.is_outlier,
            data.heldout_outliers,
            tuple(data.classes),
            num_samples=cfg.privacy.audit_samples,
            seed=audit_seed(cfg.run.seed, cfg.run.num_server_rounds),
        )
        out[name] = result.metrics()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="alignfl audit", description=audit_run.__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run folder (summary.json + generators/)")
    ap.add_argument("--data-root", default="", help="where the silos' data is (default: the run config's)")
    ap.add_argument("--write", action="store_true", help="also write <run>/decoder-audit.json")
    args = ap.parse_args(argv)
    run = Path(args.run)
    if not (run / "summary.json").is_file() or not (run / "generators").is_dir():
        print(
            f"error: {run} is not a run folder (needs summary.json and generators/): pass --run results/<run-name>",
            file=sys.stderr,
        )
        return 2
    result = audit_run(run, args.data_root)
    text = json.dumps(result, indent=2)
    if args.write:
        (run / "decoder-audit.json").write_text(text + "\n")
    print(text)
    return 0
