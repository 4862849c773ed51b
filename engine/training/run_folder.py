"""The layout of a training run folder, in one place.

    cfg.json              {"format", "identity", "config"}: what this folder trains
    log.jsonl             one line per logging step (and per redundancy check)
    state/                the last checkpoint for resuming: sae/, optim.safetensors, state.json
    final/                the trained SAE (an engine.formats.native checkpoint)
    train.json            written when training finished
    metrics-<hash>.json   cached evaluations (moesae build / analyze)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, DataError
from ..formats.native import CFG_FILE, load_native, save_sae
from ..paths import atomic_folder, atomic_write, atomic_write_json

FORMAT = "moesae-run/1"


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.cfg_path = self.path / "cfg.json"
        self.log_path = self.path / "log.jsonl"
        self.state = self.path / "state"
        self.final = self.path / "final"
        self.summary_path = self.path / "train.json"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # -- what it holds ---------------------------------------------------------------------
    def is_finished(self) -> bool:
        return (self.final / CFG_FILE).exists()

    def has_state(self) -> bool:
        return (self.state / "state.json").exists()

    @staticmethod
    def checkpoint_of(path: str | Path) -> Path:
        """The SAE checkpoint folder a path means: a finished run folder's final/, or the
        path itself (a checkpoint folder, ours or an importable one)."""
        p = Path(path)
        run = RunFolder(p)
        return run.final if run.is_finished() else p

    def claim(self, identity: dict, config: dict) -> None:
        """Record what this folder trains; ConfigError if it already holds another run."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.cfg_path.exists():
            try:
                previous = json.loads(self.cfg_path.read_text()).get("identity")
            except (OSError, ValueError) as exc:
                raise DataError(f"{self.cfg_path} is unreadable ({exc}); delete the folder.") from None
            if previous != identity:
                raise ConfigError(
                    f"{self.path} holds a run with a different configuration; "
                    "choose another --out or delete that folder."
                )
            return
        atomic_write_json(self.cfg_path, {"format": FORMAT, "identity": identity, "config": config})

    # -- the log ---------------------------------------------------------------------------
    def append_log(self, row: dict) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read_log(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def truncate_log(self, step: int) -> None:
        """After a resume, drop log lines written after the checkpoint we resume from."""
        if not self.log_path.exists():
            return
        keep = [json.dumps(r) for r in self.read_log() if r.get("step", 0) <= step]
        atomic_write(self.log_path, lambda f: f.write("".join(line + "\n" for line in keep)))

    # -- resumable state -------------------------------------------------------------------
    def save_state(self, sae, opt: torch.optim.Optimizer, step: int,
                   tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """The SAE, the optimiser state and the trainer's own tensors at `step`, atomically."""
        sd = opt.state_dict()
        # a learning rate kept on the device (a step recorded as a CUDA graph) is saved as a number
        groups = [{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in g.items()}
                  for g in sd["param_groups"]]
        flat = {f"extra.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
        for pid, st in sd["state"].items():
            for key, val in st.items():
                flat[f"{pid}.{key}"] = torch.as_tensor(val).cpu().contiguous()

        def write(tmp: Path) -> None:
            save_sae(sae, tmp / "sae", meta)
            save_file(flat, str(tmp / "optim.safetensors"))
            (tmp / "state.json").write_text(
                json.dumps({"step": step, "param_groups": groups})
            )

        atomic_folder(self.state, write, may_replace=lambda p: (p / "state.json").exists(), kind="a training state folder")

    def load_state(self, sae, opt: torch.optim.Optimizer, device) -> tuple[int, dict[str, torch.Tensor]]:
        """Restore `sae` and `opt` from state/; returns (step, the trainer's own tensors)."""
        try:
            saved, _ = load_native(self.state / "sae")
            sae.load_state_dict(saved.state_dict())
            meta = json.loads((self.state / "state.json").read_text())
            flat = load_file(str(self.state / "optim.safetensors"), device=str(device))
        except (OSError, ValueError, KeyError, RuntimeError, DataError) as exc:
            raise DataError(
                f"The checkpoint in {self.state} is unreadable ({exc}); delete it to start over."
            ) from None
        opt_state: dict = {}
        extra: dict[str, torch.Tensor] = {}
        for name, val in flat.items():
            if name.startswith("extra."):
                extra[name[len("extra."):]] = val
            elif name == "since_fired":  # written before the trainer's tensors had a prefix
                extra[name] = val
            else:
                pid, key = name.split(".", 1)
                opt_state.setdefault(int(pid), {})[key] = val
        opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
        return int(meta["step"]), extra

    def load_source_state(self) -> dict | None:
        """Where the batch source stood at the checkpoint (streams only; None otherwise)."""
        try:
            return json.loads((self.state / "sae" / CFG_FILE).read_text()).get("source_state")
        except (OSError, ValueError):
            return None

    # -- the result ------------------------------------------------------------------------
    def save_final(self, sae, meta: dict, config: dict, steps: int) -> None:
        save_sae(sae, self.final, meta)
        atomic_write_json(self.summary_path, {"config": config, "steps_done": steps})

    def metrics_cache(self, key: str) -> Path:
        return self.path / f"metrics-{key}.json"
