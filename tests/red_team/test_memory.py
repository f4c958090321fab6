"""Red team, 2. memory (every attack class: tests/red_team/__init__.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from alignfl_app.config import ArchitectureSpec, parse_run_config
from alignfl_app.contract.descriptor import GeneratorDescriptor
from alignfl_app.contract.replies import ReplyRejected
from alignfl_app.models.features import FeatureSpec
from alignfl_app.server.store import GeneratorTerms, check_decoder_state
from tests.red_team.attack_kit import NODE, honest, make_strategy, one_line_reasons, reply, rss_mb, store_snapshot


@pytest.mark.parametrize(
    "arch",
    [
        dict(kind="mlp", latent_dim=256, hidden=(4096, 4096, 4096, 4096)),
        dict(kind="conv", latent_dim=256, hidden=(4096, 4096)),
        dict(kind="mlp", latent_dim=10**7, hidden=(10**7,) * 4),
        dict(kind="conv", latent_dim=2**31, hidden=(2**31, 2**31)),
    ],
)
def test_2_tiny_reply_declaring_huge_decoder_is_rejected_without_allocating(trained, tmp_path, arch):
    cfg, outs = trained
    desc, state = outs[0]
    d = json.loads(desc.model_dump_json())
    d["architecture"] = {"name": "huge", **{k: (list(v) if isinstance(v, tuple) else v) for k, v in arch.items()}}
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))
    before = store_snapshot(tmp_path)
    tiny = {"w": np.zeros(1, np.float32)}
    rss0 = rss_mb()  # memory only: speed belongs in benchmarks, not in tests
    from alignfl_app.contract.replies import ReplyRejected
    from server_app.messages import train_reply

    with pytest.raises(ReplyRejected) as exc:
        s.core.accept(2, NODE[0], train_reply(reply(NODE[0], desc, tiny, desc_json=json.dumps(d)), 1 << 26))
    grown = rss_mb() - rss0
    assert "\n" not in str(exc.value) and str(exc.value)
    assert grown < 200, grown
    assert store_snapshot(tmp_path) == before and s.core.store.entry("silo-0")["stored_round"] == 1


def test_2_decoder_within_byte_limit_but_huge_activations_exceeds_max_sampling_mb(trained, tmp_path):
    cfg, outs = trained
    small = parse_run_config({**cfg.flat(), "max-sampling-mb": 64.0})
    desc, _ = outs[1]  # silo-1 is the conv silo
    # few parameters, 4096 channels at 14x14: ~6 MiB of activations per sample, 64 samples > 64 MiB
    arch = ArchitectureSpec(name="wide", kind="conv", latent_dim=desc.architecture.latent_dim, hidden=(4096, 8))
    attack = desc.model_copy(update={"architecture": arch})
    state = {
        k: (np.random.default_rng(0).standard_normal(v.shape) * 0.01).astype(np.float32)
        for k, v in attack.empty_decoder().state_dict().items()
    }
    assert sum(a.nbytes for a in state.values()) < small.server.max_decoder_mb * 2**20  # within the byte limit
    s = make_strategy(small, tmp_path)
    s.aggregate_train(1, honest(outs))  # honest silos fit the bound
    assert s.core.recorder.round(1)["accepted-replies"] == 3, s.core.recorder.round(1)
    before = store_snapshot(tmp_path)
    rss0 = rss_mb()
    s.aggregate_train(2, [reply(NODE[1], attack, state), *honest(outs, (0, 2))])
    rejected = s.core.recorder.round(2)["rejected-replies"]
    assert len(rejected) == 1 and ("max-sampling-mb" in rejected[0] or "MiB" in rejected[0]), rejected
    one_line_reasons(rejected)
    assert rss_mb() - rss0 < 200
    assert store_snapshot(tmp_path)["silo-1.npz"] == before["silo-1.npz"]
    # sampling of every stored generator runs in chunks within the bound
    for silo in s.core.store.silos():
        d = s.core.store.descriptor(silo)
        assert s.core.terms.sampling_chunk(d) * d.sampling_bytes_per_sample() <= small.server.max_sampling_mb * 2**20


def _attack_state(desc) -> dict[str, np.ndarray]:
    """Finite weights of the decoder ``desc`` describes (their values do not matter to a resource bound)."""
    return {k: np.full(tuple(v.shape), 0.01, np.float32) for k, v in desc.empty_decoder().state_dict().items()}


def test_2_decoder_within_byte_and_memory_limits_but_compute_heavy_is_refused_in_one_line_without_sampling(
    trained, tmp_path, monkeypatch
):
    import time

    from torch import nn

    from server_app.messages import train_reply

    cfg, outs = trained
    desc, _ = outs[1]  # silo-1 is the conv silo
    # 776 channels at 14x14 with 3 stride-1 layers: ~6.4 GFLOPs per sample, ~63 MiB, 64 samples within 1 GiB
    arch = ArchitectureSpec(
        name="heavy", kind="conv", latent_dim=desc.architecture.latent_dim, hidden=(776, 16), refine=3
    )
    attack = desc.model_copy(update={"architecture": arch})
    state = _attack_state(attack)
    s = make_strategy(cfg, tmp_path)
    s.aggregate_train(1, honest(outs))  # honest silos fit every bound (and the counter is warm, as in a server)
    assert s.core.recorder.round(1)["accepted-replies"] == 3, s.core.recorder.round(1)
    assert sum(a.nbytes for a in state.values()) < cfg.server.max_decoder_mb * 2**20  # within the byte limit
    assert s.core.terms.sampling_chunk(attack) >= 64  # and within max-sampling-mb
    before = store_snapshot(tmp_path)
    drawn = []
    forward = nn.ConvTranspose2d.forward

    def spy(self, x, *args):
        if x.device.type != "meta":
            drawn.append(tuple(x.shape))
        return forward(self, x, *args)

    monkeypatch.setattr(nn.ConvTranspose2d, "forward", spy)
    start = time.perf_counter()
    with pytest.raises(ReplyRejected) as exc:
        s.core.accept(2, NODE[1], train_reply(reply(NODE[1], attack, state), 1 << 27))
    took = time.perf_counter() - start
    reason = str(exc.value)
    assert "\n" not in reason and "max-sample-mflops=1,000" in reason and "6,398 MFLOPs" in reason, reason
    assert not drawn, drawn  # refused before a single real sample was drawn
    assert took < 1.0, took
    assert store_snapshot(tmp_path) == before and s.core.store.entry("silo-1")["stored_round"] == 1
    # the bound is the run's: raised, the same decoder passes the compute check and meets the next one (a NaN)
    generous = GeneratorTerms.from_config(parse_run_config({**cfg.flat(), "max-sample-mflops": 10_000.0}))
    first = next(iter(state))
    with pytest.raises(ReplyRejected, match="contains NaN or Inf"):
        check_decoder_state(attack, {**state, first: np.full_like(state[first], np.nan)}, generous)
    assert not drawn


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 64, 64), (1, 128, 128)])
def test_2_every_shipped_architecture_draws_within_the_default_compute_bound_with_headroom(shape):
    from alignfl_app.config import ServerSection, conf_dir, load_architecture

    bound = ServerSection().max_sample_mflops * 1e6
    names = sorted(p.stem for p in (conf_dir() / "architectures").glob("*.toml"))
    assert {"conv", "conv-deep", "gaussian", "mlp"} <= set(names)
    for name in names:
        spec = load_architecture(name)
        for layout in ("conditional", "per-class"):
            desc = GeneratorDescriptor(
                silo="s",
                architecture=spec,
                layout=layout,
                classes=tuple("0123456789"),
                image_shape=shape,
                round=1,
                features=FeatureSpec(space="scattering") if spec.kind == "gaussian" else None,
            )
            assert 0 < desc.sampling_flops_per_sample() <= bound / 2, (name, layout, desc.sampling_flops_per_sample())


# One chunk of samples in a fresh interpreter whose allocator maps every large block (so the resident peak is the
# live peak): decoders built from each descriptor JSON on stdin, with its chunk; prints each chunk's peak growth.
PEAK_PROBE = r"""
import json, sys, torch
from alignfl_app.contract.descriptor import GeneratorDescriptor

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

peaks = []
for text, chunk in json.load(sys.stdin):
    desc = GeneratorDescriptor.model_validate_json(text)
    decoder = desc.build_decoder().eval()  # initialised as a silo starts it
    with torch.no_grad():
        z = torch.randn(chunk, desc.latent_dim)
        y = torch.eye(len(desc.classes))[torch.arange(chunk) % len(desc.classes)] if desc.cond_dim else None
        decoder(z[:2], None if y is None else y[:2])  # kernels set up outside the measure
        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the current RSS
        before = status("VmRSS")
        decoder(z, y)
        peaks.append(status("VmHWM") - before)
print(json.dumps(peaks))
"""


def _widest(make: Callable[[int], GeneratorDescriptor], terms: GeneratorTerms) -> GeneratorDescriptor:
    """The widest descriptor ``make(width)`` that passes every bound ``check_decoder_state`` applies before it reads
    a tensor (an empty state then fails at the first tensor check, and only there)."""

    def bounded(width: int) -> bool:
        with pytest.raises(ReplyRejected) as exc:
            check_decoder_state(make(width), {}, terms)
        return str(exc.value).startswith("missing decoder tensors")

    lo, hi = 1, 1024
    assert bounded(lo) and not bounded(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if bounded(mid) else (lo, mid)
    return make(lo)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_2_sampling_memory_estimate_is_not_below_the_measured_peak_of_the_largest_accepted_decoders():
    """The server draws ``sampling_chunk`` samples per pass, trusting the estimate: for the widest decoder of each kind
    the terms accept at 28x28 (an MLP layer, a transposed conv 4x4 stage, stride-1 refine layers, Gaussians as wide
    as the byte limit lets them), one pass's measured peak must stay within it, every kernel workspace included."""
    import os
    import subprocess
    import sys

    # the run's limits scaled down (max-decoder-mb 4, max-sampling-mb 16) so that a pass takes a fraction of a second
    features = FeatureSpec(space="scattering", scales=2, angles=12, pool=2)  # 676 features: 3.5 MiB for 2 classes
    terms = GeneratorTerms(
        (1, 28, 28), True, ("0", "1"), 4 << 20, {"s": frozenset({"0", "1"})}, 16 << 20, features=features
    )

    def desc(layout: str = "conditional", **arch) -> GeneratorDescriptor:
        return GeneratorDescriptor(
            silo="s",
            architecture=ArchitectureSpec(name="widest", **arch),
            layout=layout,
            classes=("0", "1"),
            image_shape=(1, 28, 28),
            round=1,
            features=features if arch["kind"] == "gaussian" else None,
        )

    largest = {
        "mlp": _widest(lambda w: desc(kind="mlp", latent_dim=256, hidden=(w,)), terms),
        "conv": _widest(lambda w: desc(kind="conv", latent_dim=256, hidden=(w, 8)), terms),
        "conv refine": _widest(lambda w: desc(kind="conv", latent_dim=256, hidden=(w, 16), refine=3), terms),
        "gaussian": desc(kind="gaussian", components=1),
        "gaussian per class": desc("per-class", kind="gaussian", components=1),
    }
    for d in largest.values():  # accepted with a full state, not only within the bounds
        check_decoder_state(
            d, {k: np.zeros(v.shape, np.float32) for k, v in d.empty_decoder().state_dict().items()}, terms
        )
    items = [(d.model_dump_json(), terms.sampling_chunk(d)) for d in largest.values()]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE],
        input=json.dumps(items),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    peaks = json.loads(run.stdout.strip().splitlines()[-1])
    for (kind, d), (_, chunk), peak in zip(largest.items(), items, peaks, strict=True):
        estimate = chunk * d.sampling_bytes_per_sample() + d.sampling_bytes_per_pass()
        assert estimate <= terms.max_sampling_bytes, (kind, estimate)
        assert peak <= estimate, (
            f"{kind} {d.architecture.hidden}: measured {peak / 2**20:.1f} MiB > {estimate / 2**20:.1f}"
        )
