"""The tasks experiments train on, and the branch point every compared model starts from: `LMTask` (real text,
windows inside documents), `MQARTask` (multi-query associative recall, dsa_lab/experiments/mqar.py) and
`branch_point` (stage 0 of one (task, L, seed), cached)."""
from __future__ import annotations

from pathlib import Path

import torch

from config import ModelConfig, TrainConfig
from dsa_lab.experiments import mqar
from dsa_lab.experiments import skeleton as experiment
from dsa_lab.training.data import STREAM_PRETRAIN, BatchStream, build_windows, eval_subset, stream_seed
from dsa_lab.training.train import Execution, dense_pretrain, state_of


class TaskStream:
    """MQAR batches as the trainer wants them: next() -> inputs (B, L), targets (B, L) (-100 = not scored)."""

    def __init__(self, stream: mqar.MQARStream):
        self.stream, self.step = stream, 0

    def next(self):
        batch = self.stream.batch(self.step)
        self.step += 1
        return batch.inputs, batch.targets

    def state_dict(self) -> dict:
        return {"step": self.step}  # a batch is a pure function of (seed, step)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class LMTask:
    name = "lm"

    def __init__(self, corpus, L: int, tcfg: TrainConfig):
        self.windows = build_windows(corpus, L)
        self.val = eval_subset(self.windows.val, tcfg.eval_windows)
        self.batch_size = tcfg.batch_size

    def stream(self, seed: int, purpose: int):
        return BatchStream(self.windows.train, self.batch_size, stream_seed(seed, purpose))

    def extra_metrics(self, model, device) -> dict:
        return {}


class MQARTask:
    name = "mqar"

    def __init__(self, options: dict, L: int, tcfg: TrainConfig):
        self.options = {k: options[k] for k in ("num_keys", "num_values") if k in options}
        self.pairs, self.vocab, self.L, self.batch_size = options["num_pairs"], options["vocab_size"], L, tcfg.batch_size
        held = mqar.MQARStream(L, self.pairs, self.vocab, tcfg.batch_size, seed=0, **self.options).held_out(
            tcfg.eval_windows)
        self.held_out = held
        self.val = (held.inputs, held.targets)

    def stream(self, seed: int, purpose: int, L: int | None = None):
        return TaskStream(mqar.MQARStream(L or self.L, self.pairs, self.vocab, self.batch_size,
                                          seed=stream_seed(seed, purpose), **self.options))

    @torch.no_grad()
    def extra_metrics(self, model, device) -> dict:
        """Accuracy by query-key distance on the held-out set; for a model that selects keys also, per layer, how
        often the selection at an answer row holds the asked pair's key and value tokens (mqar.answer_hits)."""
        model.eval()
        logits, selected = [], []
        for i in range(0, len(self.held_out), 32):
            out, aux = model(self.held_out.inputs[i: i + 32].to(device), return_aux=True)
            logits.append(out.float().cpu())
            selected.append([layer.selected_idx.cpu() if layer.selected_idx is not None else None
                             for layer in aux.layers])
        logits = torch.cat(logits)
        result = mqar.accuracy(logits, self.held_out)
        metrics = {"accuracy": result["accuracy"], "accuracy_by_distance": result["by_distance"]}
        if all(sel is not None for sel in selected[0]):  # a model with a selection in every layer
            per_layer = [torch.cat(chunks) for chunks in zip(*selected)]
            correct = logits.argmax(-1) == self.held_out.targets  # (N, L)
            metrics["answer_hits"] = mqar.answer_hits(per_layer, self.held_out.distance, correct)
        return metrics


def branch_point(task, cfg: ModelConfig, tcfg: TrainConfig, seed: int, device, path: Path, fingerprint_: str,
                 start: dict | None = None, run: Execution = Execution()) -> dict:
    """Stage 0, shared by every model of this (task, L, seed): dense training of the classic model
    (train.dense_pretrain) on the seed's STREAM_PRETRAIN, from `start` (MQAR: the curriculum, or the previous
    length's branch point) or from scratch. Cached as `path` + its .json (experiment.cached_state); `run` may
    checkpoint it on the way."""
    def compute():
        classic, _ = dense_pretrain(cfg, task.stream(seed, STREAM_PRETRAIN), task.val, tcfg, seed, device,
                                    f"{task.name} L={cfg.max_seq_len} seed={seed}", run, start,
                                    name=f"pretrain_L{cfg.max_seq_len}")
        return state_of(classic), {"seed": seed}
    return experiment.cached_state(path, fingerprint_, compute, device)
