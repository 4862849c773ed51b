"""The training step recorded once as a CUDA graph and replayed (`--cuda-graph`).

A replay repeats the recorded kernels on the recorded memory, so the step may keep nothing
between steps in a tensor it replaces: on the CPU we check that everything a step changes and
a later step reads is changed in place, and the sentences for a graph asked for where there
can be none. On CUDA (skipped elsewhere) the graphed trainer against the eager one, through
AuxK's re-recording and a resume from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.data.activation_store import ActivationStore
from engine.data.batches import harvest_batches
from engine.errors import ConfigError
from engine.formats import load_sae
from engine.options import set_flat
from engine.runtime import RuntimeConfig, resolve
from engine.sae import SAEConfig, build_sae
from engine.training.config import TrainConfig
from engine.training.distributed import from_environment
from engine.training.run_folder import RunFolder
from engine.training.schedule import make_adam
from engine.training.trainer import Trainer, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg(acts, out, **kw) -> TrainConfig:
    base = dict(acts=str(acts), out=str(out), arch="scale", width=512, experts=4, active=2, k=8,
                steps=40, batch_tokens=256, checkpoint_every=20, log_every=5, device="cpu",
                dead_tokens=256)  # features die within the run: AuxK's pick count changes
    base.update(kw)
    return set_flat(TrainConfig(), base)


def _lasting_tensors(t: Trainer) -> dict[str, int]:
    """Where everything a step writes and a later step reads lives."""
    out = {f"param {n}": p.data_ptr() for n, p in t.sae.named_parameters()}
    for i, st in enumerate(t.opt.state.values()):
        out.update({f"adam {i} {k}": v.data_ptr() for k, v in st.items() if torch.is_tensor(v)})
    for name in ("since_fired", "first_bad", "step_t"):
        out[name] = getattr(t, name).data_ptr()
    out["window sums"], out["window load"] = t.window.sums.data_ptr(), t.window.load.data_ptr()
    return out


@pytest.mark.parametrize("arch", ["topk", "switch", "scale"])
def test_a_step_changes_what_lasts_in_place(tiny_acts, tmp_path, arch):
    cfg = _cfg(tiny_acts.path, tmp_path / "run", arch=arch)
    dist, device = from_environment("cpu", None)
    rt = resolve(RuntimeConfig(device=str(device)))
    source = harvest_batches(ActivationStore(cfg.acts), cfg.batch_tokens, cfg.seed, rt.device, cfg.batches)
    t = Trainer(cfg, source, rt, dist, progress=False)
    t.start()
    t.step(0, source.batch(0))  # Adam's state exists from the first step on
    before = _lasting_tensors(t)
    k_aux = set()
    for step in range(1, cfg.steps):
        t.step(step, source.batch(step))
        k_aux.add(t.k_aux)
        assert _lasting_tensors(t) == before, f"replaced at step {step}"
    assert len(k_aux) > 1, "AuxK's pick count should have changed within the run"
    t.finish()


class FakeRecorder:
    """CUDA's recorder as the trainer sees it, on the CPU: `record` runs nothing and returns
    a replay that runs the recorded step (on its recorded input); `eager` runs a step."""

    def __init__(self, device):
        self.calls: list[str] = []

    def eager(self, fn):
        self.calls.append("eager")
        fn()

    def record(self, fn):
        self.calls.append("record")

        def replay():
            self.calls.append("replay")
            fn()

        return replay


def _trainer(cfg):
    dist, _ = from_environment("cpu", None)
    rt = resolve(RuntimeConfig(device="cpu"))
    source = harvest_batches(ActivationStore(cfg.acts), cfg.batch_tokens, cfg.seed, rt.device, cfg.batches)
    return Trainer(cfg, source, rt, dist, progress=False), source


@pytest.mark.parametrize("arch", ["topk", "scale"])
def test_the_recording_sequence_trains_as_the_eager_trainer(tiny_acts, tmp_path, monkeypatch, arch):
    """With a stand-in for CUDA's recorder, the graphed trainer on the CPU: three warm-up steps,
    one recording, replays; a new recording (after one warm-up step) whenever AuxK's pick
    count changes at a log step; every call is exactly one step; and the weights, the log and
    Adam's step count are the eager trainer's."""
    from engine.training import trainer as trainer_mod

    cfg_eager = _cfg(tiny_acts.path, tmp_path / "eager", arch=arch)
    eager, source = _trainer(cfg_eager)
    eager.start()
    for step in range(cfg_eager.steps):
        eager.step(step, source.batch(step))
    eager.finish()

    recorders = []
    monkeypatch.setattr(trainer_mod, "use_cuda_graph", lambda *a: True)
    monkeypatch.setattr(trainer_mod, "StepRecorder",
                        lambda device: recorders.append(FakeRecorder(device)) or recorders[-1])
    cfg = _cfg(tiny_acts.path, tmp_path / "graphed", arch=arch)
    t, source = _trainer(cfg)
    t.start()
    k_aux = [t.k_aux]
    for step in range(cfg.steps):
        t.step(step, source.batch(step))
        k_aux.append(t.k_aux)
    t.finish()
    calls = recorders[0].calls
    # changes that a later step saw (the last log step's comes after the last step)
    changes = sum(a != b for a, b in zip(k_aux[:-2], k_aux[1:-1], strict=True))
    assert changes >= 1
    assert calls[:5] == ["eager", "eager", "eager", "record", "replay"]
    assert calls.count("record") == t.recordings == 1 + changes
    assert calls.count("eager") == 3 + changes
    assert calls.count("eager") + calls.count("replay") == cfg.steps
    assert int(next(iter(t.opt.state.values()))["step"]) == cfg.steps
    # equal to float32 rounding: capturable Adam computes its bias correction on the device
    for (n, a), b in zip(eager.sae.state_dict().items(), t.sae.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (n, float((a - b).abs().max()))
    for a, b in zip(_train_log(cfg_eager.out), _train_log(cfg.out), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
            else:
                assert b[key] == a[key], key


def test_a_failed_recording_stops_with_the_way_to_resume(tiny_acts, tmp_path, monkeypatch):
    from engine.errors import TrainingError
    from engine.training import trainer as trainer_mod

    class Refuses(FakeRecorder):
        def record(self, fn):
            try:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            except RuntimeError:
                raise RuntimeError("") from None

    monkeypatch.setattr(trainer_mod, "use_cuda_graph", lambda *a: True)
    monkeypatch.setattr(trainer_mod, "StepRecorder", Refuses)
    with pytest.raises(TrainingError) as e:
        train(_cfg(tiny_acts.path, tmp_path / "run"), progress=False)
    msg = str(e.value)
    assert msg.startswith("The training step could not be recorded as a CUDA graph")
    assert "--cuda-graph off to resume from step 0" in msg


def test_a_graph_where_there_can_be_none_is_one_sentence(tiny_acts, tmp_path):
    with pytest.raises(ConfigError) as e:
        train(_cfg(tiny_acts.path, tmp_path / "run", cuda_graph="on"), progress=False)
    msg = str(e.value)
    assert "--cuda-graph on cannot be used here: it needs a CUDA device" in msg and msg.count(".") == 1
    assert not (tmp_path / "run").exists()  # refused before the run folder was claimed


def test_a_learning_rate_on_the_device_is_checkpointed_as_a_number(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    sae = build_sae(SAEConfig(d_in=8, width=16, arch="topk", k=2))
    opt = make_adam(sae.parameters(), torch.tensor(3e-4))
    for p in sae.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    run.save_state(sae, opt, 7, {"since_fired": torch.zeros(16, dtype=torch.long)}, {})
    saved = json.loads((run.state / "state.json").read_text())
    assert saved["param_groups"][0]["lr"] == pytest.approx(3e-4)
    again = make_adam(sae.parameters(), 1e-3)
    step, _ = run.load_state(sae, again, "cpu")
    assert step == 7 and again.param_groups[0]["lr"] == pytest.approx(3e-4)


def _weights(run) -> dict[str, torch.Tensor]:
    sae, _ = load_sae(run / "final")
    return {k: v.float() for k, v in sae.state_dict().items()}


def _train_log(run) -> list[dict]:
    """The train lines of a run's log, without the wall-clock rate."""
    rows = [json.loads(x) for x in (Path(run) / "log.jsonl").read_text().splitlines() if x.strip()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows if r["kind"] == "train"]


@needs_cuda
@pytest.mark.parametrize("arch", ["topk", "switch", "scale"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_graphed_trainer_trains_as_the_eager_one(tiny_acts, tmp_path, arch, precision):
    """Where the step can be recorded (`auto`), the graphed run's log and weights are the eager
    run's; where it cannot (the experts' fp32 matmuls are a host-synchronised loop), `auto`
    trains eagerly and `on` is refused in one sentence."""
    can = _recordable(arch, precision)
    runs = {}
    for mode in ("off", "auto"):
        cfg = _cfg(tiny_acts.path, tmp_path / mode, arch=arch, device="cuda", precision=precision,
                   cuda_graph=mode)
        runs[mode] = train(cfg, progress=False)
    eager, graphed = _train_log(runs["off"]), _train_log(runs["auto"])
    assert all(r["cuda_graph"] is False for r in eager)
    assert all(r["cuda_graph"] is can for r in graphed)
    assert [r["step"] for r in graphed] == [r["step"] for r in eager]
    for a, b in zip(eager, graphed, strict=True):  # atomics make neither bit-exact
        assert b["fvu"] == pytest.approx(a["fvu"], rel=0.02, abs=1e-3)
        assert b["dead_fraction"] == pytest.approx(a["dead_fraction"], abs=0.05)
    we, wg = _weights(runs["off"]), _weights(runs["auto"])
    for k in we:
        assert torch.allclose(wg[k], we[k], rtol=0.05, atol=2e-3), k
    if not can:
        with pytest.raises(ConfigError, match="--cuda-graph on cannot be used here"):
            train(_cfg(tiny_acts.path, tmp_path / "on", arch=arch, device="cuda",
                       precision=precision, cuda_graph="on"), progress=False)


def _recordable(arch: str, precision: str) -> bool:
    rt = resolve(RuntimeConfig(device="cuda", precision=precision))
    sae = build_sae(SAEConfig(d_in=8, width=16, arch=arch, k=2, experts=4))
    return not sae.step_waits_for_device(rt.device, rt.compute_dtype)


@needs_cuda
def test_a_graph_records_while_batches_are_prefetched_from_pinned_memory(tiny_acts, tmp_path):
    """The pinned source's thread allocates and copies on its own stream while the step is
    being recorded (the recording is thread-local); training matches the resident source's."""
    arch = "scale" if _recordable("scale", "bf16") else "topk"
    runs = {src: train(_cfg(tiny_acts.path, tmp_path / src, arch=arch, device="cuda", precision="bf16",
                            cuda_graph="on", batches=src), progress=False)
            for src in ("resident", "pinned")}
    a, b = _train_log(runs["resident"]), _train_log(runs["pinned"])
    assert all(r["cuda_graph"] for r in b)
    assert b[-1]["fvu"] == pytest.approx(a[-1]["fvu"], rel=0.02, abs=1e-3)


@needs_cuda
def test_a_graphed_run_resumes_from_its_checkpoint(tiny_acts, tmp_path):
    """Stopped after its first checkpoint and started again (the lr and Adam's step count were
    on the device), it ends where an uninterrupted run ends; and a graphed run's checkpoint
    resumes without a graph too."""
    arch = "scale" if _recordable("scale", "bf16") else "topk"  # Scale: Hopper/Blackwell only
    whole = train(_cfg(tiny_acts.path, tmp_path / "whole", arch=arch, device="cuda", precision="bf16"),
                  progress=False)

    class StopsAt25:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def batch(self, step):
            if step == 25:
                raise KeyboardInterrupt
            return self.inner.batch(step)

    for mode in ("on", "off"):
        cfg = _cfg(tiny_acts.path, tmp_path / f"cut-{mode}", arch=arch, device="cuda",
                   precision="bf16", cuda_graph="on")
        source = harvest_batches(ActivationStore(cfg.acts), cfg.batch_tokens, cfg.seed,
                                 torch.device("cuda"), cfg.batches)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False, source=StopsAt25(source))
        resumed = train(set_flat(cfg, {"cuda_graph": mode}), progress=False)
        wa, wb = _weights(whole), _weights(resumed)
        for k in wa:
            assert torch.allclose(wb[k], wa[k], rtol=0.05, atol=2e-3), (mode, k)
