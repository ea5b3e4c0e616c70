"""Distillation onto the GGUF grids: the student is the model with every written tensor fake-quantized
(fakequant), the teacher the same model with its original weights (one module, the weights swapped
per pass, so memory holds one model, its original and trained weights and Adam's two moments).
Loss: KL divergence from the teacher's next-token distribution, optionally plus the next-token loss.
A few windows of the training text are held out; the state with the lowest held-out KL divergence
(step 0 included: the starting point) is the one returned, so training never makes the file worse
on text it was not fitted to."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ggufkit.errors import GgufkitError
from ggufkit.progress import bar
from ggufkit.qat.fakequant import TensorQuantizer, fake_quantize

STATE_FILE = "state.pt"


@dataclass
class Settings:
    steps: int = 200
    lr: float = 1e-5
    seq: int = 256  # tokens per window
    batch: int = 4  # windows per step
    ce_weight: float = 0.0  # weight of the next-token loss beside the KL divergence
    eval_every: int = 25  # steps between held-out evaluations
    heldout: int = 4  # windows of the text kept out of training
    device: str = "cpu"
    seed: int = 0


@dataclass
class Result:
    weights: dict[str, np.ndarray]  # the best state's weights, checkpoint names and layout
    best_step: int
    heldout_kl: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out mean KL)
    tokens_per_s: float = 0.0
    seconds: float = 0.0


def load_model(src: Path, device: str):
    """The checkpoint as a transformers model in float32 (gradients of the weights only)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # ours shows the training
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(device)
    model.eval()  # no dropout: student and teacher see the same function of their weights
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def training_windows(src: Path, texts, settings: Settings) -> torch.Tensor:
    """The texts, tokenized by the checkpoint's tokenizer and concatenated, in windows of
    `settings.seq`; an error when they do not fill the held-out windows and one to train on."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = []
    for t in texts:
        ids += tokenizer(Path(t).read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    n = len(ids) // settings.seq
    if n < settings.heldout + 1:
        raise GgufkitError(f"the training text has {len(ids)} tokens, {n} windows of {settings.seq}; it needs "
                           f"more than the {settings.heldout} held out", Path(texts[0]))
    return torch.tensor(ids[:n * settings.seq], dtype=torch.long).reshape(n, settings.seq)


def check_device(device: str) -> None:
    """A one-line error for a device this torch cannot train on."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise GgufkitError(f"--device {device!r}: not cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise GgufkitError(f"--device {device}: torch {torch.__version__} finds no CUDA device here")


class Weights:
    """The model's weights by checkpoint name, bound into the module as plain tensors (tied weights,
    such as a shared embedding and output, bound together)."""

    def __init__(self, model):
        self.model = model
        tied: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            tied.setdefault(id(p), []).append(name)
        self.original = {names[0]: p.detach().clone() for names, p in
                         ((tied[id(p)], p) for _, p in model.named_parameters())}
        self.aliases = {names[0]: names for names in tied.values()}
        for names in tied.values():
            for name in names:
                module, leaf = self._owner(name)
                del module._parameters[leaf]
        self.bind(self.original)

    def _owner(self, name: str):
        path, _, leaf = name.rpartition(".")
        return self.model.get_submodule(path), leaf

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            for alias in self.aliases[name]:
                module, leaf = self._owner(alias)
                setattr(module, leaf, t)


def _checkpoint_layers(model) -> None:
    """Recompute each layer's activations in the backward pass (memory: one layer's, not all).
    transformers checkpoints only layers in training mode: set on the layers alone, so dropout
    inside them stays off."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2's name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            m.training = True


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), from logits."""
    t = torch.log_softmax(teacher.float(), dim=-1)
    s = torch.log_softmax(student.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _batch(windows: torch.Tensor, step: int, size: int, seed: int) -> torch.Tensor:
    """The windows of `step`: epochs of a seeded shuffle, so a resumed run sees what it would have."""
    n = windows.shape[0]
    picks = [(step * size + i) for i in range(size)]
    order = {e: np.random.default_rng(seed + e).permutation(n) for e in {p // n for p in picks}}
    return windows[[order[p // n][p % n] for p in picks]]


def train(src: Path, quantizers: dict[str, TensorQuantizer], windows: torch.Tensor, settings: Settings,
          init: dict[str, np.ndarray] | None = None, state_dir: Path | None = None,
          resume: Path | None = None, on_step: Callable[[int, float], None] | None = None) -> Result:
    """Train the checkpoint at `src` onto its grids (`quantizers`, by checkpoint name) on the token
    `windows` of training_windows (its last settings.heldout held out), starting from `init`
    (checkpoint names -> values; default: the checkpoint's own). Ctrl-C saves the state in
    `state_dir` (to continue with `resume`) and raises KeyboardInterrupt."""
    torch.manual_seed(settings.seed)
    model = load_model(src, settings.device)
    weights = Weights(model)
    missing = [n for n in quantizers if n not in weights.original]
    if missing:
        raise GgufkitError(f"checkpoint tensor {missing[0]!r} is not a weight of the transformers model", src)
    heldout, windows = windows[-settings.heldout:], windows[:-settings.heldout]
    latent = {n: torch.tensor(init[n] if init and n in init else w.cpu().numpy(), device=settings.device,
                              requires_grad=True)
              for n, w in weights.original.items() if n in quantizers}
    opt = torch.optim.Adam(latent.values(), lr=settings.lr)
    step, history, best = 0, [], None
    if resume is not None:
        step, history, best = _load_state(resume, latent, opt)

    def quantized() -> dict[str, torch.Tensor]:
        return {n: fake_quantize(w, quantizers[n]) for n, w in latent.items()}

    def heldout_kl() -> float:
        with torch.no_grad():
            total, student = 0.0, quantized()  # the whole model rounded once, not once per batch
            for w in heldout.to(settings.device).split(settings.batch):
                weights.bind(weights.original)
                teacher = model(w).logits
                weights.bind(student)
                total += float(_kl(teacher, model(w).logits)) * w.shape[0]
            return total / heldout.shape[0]

    def evaluate(at: int) -> None:
        nonlocal best
        kl = heldout_kl()
        history.append((at, kl))
        tqdm.write(f"qat: step {at}/{settings.steps}: held-out KL divergence {kl:.5f}", file=sys.stderr)
        if best is None or kl < best[1]:
            best = (at, kl, {n: w.detach().cpu().numpy().copy() for n, w in latent.items()})

    if best is None:
        evaluate(0)
    _checkpoint_layers(model)
    t0, tokens = time.perf_counter(), 0
    try:
        with bar(total=settings.steps, initial=step, desc="qat", unit="step") as pbar:
            while step < settings.steps:
                x = _batch(windows, step, settings.batch, settings.seed).to(settings.device)
                with torch.no_grad():
                    weights.bind(weights.original)
                    teacher = model(x).logits
                weights.bind(quantized())
                student = model(x).logits
                loss = _kl(teacher, student)
                if settings.ce_weight:
                    loss = loss + settings.ce_weight * torch.nn.functional.cross_entropy(
                        student[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss = float(loss.detach())
                step += 1
                tokens += x.numel()
                rate = tokens / (time.perf_counter() - t0)
                pbar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
                pbar.update(1)
                if on_step is not None:
                    on_step(step, loss)
                if step % settings.eval_every == 0 or step == settings.steps:
                    evaluate(step)
    except KeyboardInterrupt:
        if state_dir is not None:
            _save_state(state_dir, step, history, best, latent, opt)
        raise
    seconds = time.perf_counter() - t0
    return Result({n: w for n, w in best[2].items()}, best[0], history, tokens / seconds if seconds else 0.0, seconds)


def _save_state(folder: Path, step: int, history, best, latent, opt) -> None:
    """Everything a resumed run needs, written whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / (STATE_FILE + ".part")
    torch.save({"step": step, "history": history, "best": best,
                "latent": {n: w.detach().cpu() for n, w in latent.items()}, "optimizer": opt.state_dict()}, part)
    os.replace(part, folder / STATE_FILE)


def _load_state(folder: Path, latent, opt):
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise GgufkitError("no saved qat state here", path)
    try:
        state = torch.load(path, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise GgufkitError(f"cannot read the saved qat state: {exc}", path) from exc
    if set(state["latent"]) != set(latent) or any(state["latent"][n].shape != w.shape for n, w in latent.items()):
        raise GgufkitError("the saved qat state belongs to another model or type", path)
    with torch.no_grad():
        for n, w in latent.items():
            w.copy_(state["latent"][n])
    opt.load_state_dict(state["optimizer"])
    return state["step"], state["history"], state["best"]
