"""Fine-tune a `SpeechEncoderDecoderModel` on (audio, text) pairs: the seed's recipe, made robust.

`input_values` + `labels` → cross-entropy loss → backward, with AdamW, linear warm-up and decay,
gradient clipping, length-bucketed batches under an audio-seconds budget, periodic evaluation,
checkpoints and exact resume (model, optimizer, schedule, RNG and data position are restored).

An optional auxiliary CTC loss on the encoder output (over the decoder's tokens) gives the
encoder a direct alignment signal; without it a model trained from scratch sits at chance for a
long time before the decoder learns to attend. The CTC head is a training aid only and is not part
of the exported checkpoint.
"""

import dataclasses
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoFeatureExtractor, AutoTokenizer, SpeechEncoderDecoderModel

from model_store.corpus import CorpusSplit, Example
from model_store.evaluate import transcribe_batch, word_error_rate

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a training run (saved beside each checkpoint)."""

    init: str  # checkpoint folder to start from (composed or pretrained)
    corpus: str  # corpus folder with train.* and dev.* splits
    out: str  # where checkpoints and the final model go
    max_steps: int = 6000
    batch_seconds: float = 48.0  # padded audio per batch
    max_batch_size: int = 48
    lr: float = 1e-3
    warmup_steps: int = 400
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    ctc_weight: float = 0.5
    eval_every: int = 500
    eval_size: int = 200
    save_every: int = 250
    seed: int = 0
    freeze_feature_encoder: bool = False
    # freeze the first N convolutions of the feature encoder (generic filter banks): their
    # backward pass is about a third of a step's compute, for little gain when fine-tuning
    freeze_conv_layers: int = 0
    device: str = "auto"
    threads: int = 0  # 0: torch's default
    save_fp16: bool = True  # halves the exported weights; served in the dtype the service picks
    max_minutes: float = 0.0  # > 0: stop (save, export) after this many minutes of this process
    export_best: bool = False  # export the checkpoint with the lowest dev WER, not the last one


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def epoch_batches(lengths: list[int], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """Length-bucketed batches of one epoch, in a random but reproducible order."""
    rng = random.Random(cfg.seed * 7919 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    budget = int(cfg.batch_seconds * 16_000)
    batches: list[list[int]] = []
    for start in range(0, len(order), 1000):
        group = sorted(order[start : start + 1000], key=lengths.__getitem__)
        batch: list[int] = []
        for idx in group:
            longest = max(lengths[idx], *(lengths[i] for i in batch)) if batch else lengths[idx]
            if batch and (longest * (len(batch) + 1) > budget or len(batch) >= cfg.max_batch_size):
                batches.append(batch)
                batch = []
            batch.append(idx)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def batch_stream(lengths: list[int], cfg: TrainConfig, start_step: int) -> Iterator[list[int]]:
    """Batches from `start_step` on, the same sequence whether or not the run was resumed."""
    step, epoch = 0, 0
    while True:
        for batch in epoch_batches(lengths, cfg, epoch):
            if step >= start_step:
                yield batch
            step += 1
        epoch += 1


class Trainer:
    """One training run; `run()` trains to `max_steps`, resuming from `out/last` if present."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = _device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        resume = self.out / "last"
        source = resume if (resume / "trainer_state.json").exists() else Path(cfg.init)
        self.model = SpeechEncoderDecoderModel.from_pretrained(source, dtype=torch.float32)
        self.model.to(self.device)  # type: ignore[arg-type]
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.init)
        self.feature_extractor = AutoFeatureExtractor.from_pretrained(cfg.init)
        if cfg.freeze_feature_encoder:
            self.model.freeze_feature_encoder()
        extractor = self.model.encoder.feature_extractor
        conv_layers: nn.ModuleList = extractor.conv_layers  # type: ignore[union-attr,assignment]
        for layer in list(conv_layers)[: cfg.freeze_conv_layers]:
            for param in layer.parameters():
                param.requires_grad = False
        hidden = self.model.encoder.config.hidden_size
        self.ctc_head = nn.Linear(hidden, self.model.decoder.config.vocab_size).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += list(self.ctc_head.parameters())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.train_split = CorpusSplit(Path(cfg.corpus), "train")
        self.dev_split = CorpusSplit(Path(cfg.corpus), "dev")
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.best_wer = math.inf
        if source == resume:
            self._load_state(resume)

    def _lr_factor(self, step: int) -> float:
        warm = self.cfg.warmup_steps
        if step < warm:
            return (step + 1) / warm
        return max(
            0.02, 0.5 * (1 + math.cos(math.pi * (step - warm) / (self.cfg.max_steps - warm)))
        )

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Features, attention mask, decoder labels (+ EOS, -100 padding) and CTC targets."""
        feats = self.feature_extractor(
            [ex.audio for ex in examples],
            sampling_rate=16_000,
            padding=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        eos = self.model.config.eos_token_id
        ids = [
            [*self.tokenizer(ex.text, add_special_tokens=False).input_ids, eos] for ex in examples
        ]
        labels = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.long)
        for row, seq in enumerate(ids):
            labels[row, : len(seq)] = torch.tensor(seq)
        ctc = [seq[:-1] for seq in ids]  # the CTC blank is the pad token, never a target
        return {
            "input_values": feats["input_values"],
            "attention_mask": feats["attention_mask"],
            "labels": labels,
            "ctc_targets": torch.tensor([t for seq in ctc for t in seq], dtype=torch.long),
            "ctc_target_lengths": torch.tensor([len(seq) for seq in ctc], dtype=torch.long),
        }

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float, float]:
        """Total loss, and the cross-entropy and CTC parts as floats for the progress bar."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        out = self.model(
            input_values=batch["input_values"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
        )
        if not self.cfg.ctc_weight:
            return out.loss, out.loss.detach().item(), 0.0
        log_probs = self.ctc_head(out.encoder_last_hidden_state).log_softmax(-1).float()
        frames = self.model.encoder._get_feat_extract_output_lengths(  # type: ignore[operator]
            batch["attention_mask"].sum(-1)
        )
        ctc = nn.functional.ctc_loss(
            log_probs.transpose(0, 1),
            batch["ctc_targets"],
            frames,
            batch["ctc_target_lengths"],
            blank=self.model.config.pad_token_id,
            zero_infinity=True,
        )
        return out.loss + self.cfg.ctc_weight * ctc, out.loss.detach().item(), ctc.detach().item()

    def train_step(self, indices: list[int]) -> float:
        self.model.train()
        loss, ce, ctc = self.loss(self.collate([self.train_split[i] for i in indices]))
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        nn.utils.clip_grad_norm_(params, self.cfg.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        value = loss.detach().item()
        self._last = {"loss": value, "ce": ce, "ctc": ctc}
        return value

    def evaluate(self) -> float:
        """Word error rate of greedy decoding on the first `eval_size` dev utterances."""
        self.model.eval()
        n = min(self.cfg.eval_size, len(self.dev_split))
        refs, hyps = [], []
        for start in range(0, n, 32):
            examples = [self.dev_split[i] for i in range(start, min(n, start + 32))]
            hyps += transcribe_batch(
                self.model, self.feature_extractor, self.tokenizer, [ex.audio for ex in examples]
            )
            refs += [ex.text for ex in examples]
        return word_error_rate(refs, hyps)

    def run(self, stop_after: int | None = None) -> Path | None:
        """Train to `max_steps` (or until `max_minutes` ran out: then it saves and exports what
        it has, and a later run with a larger budget resumes) and export; `stop_after` N steps
        simulates an interruption."""
        lengths = [row["length"] for row in self.train_split.rows]
        stream = batch_stream(lengths, self.cfg, self.step)
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, dynamic_ncols=True, mininterval=5)
        started = time.monotonic()
        budget = self.cfg.max_minutes * 60
        while self.step < self.cfg.max_steps:
            if stop_after is not None and self.step >= stop_after:
                bar.close()
                return None
            self.train_step(next(stream))
            bar.update(1)
            bar.set_postfix(self._last | {"lr": self.scheduler.get_last_lr()[0]}, refresh=False)
            record: dict[str, float] = {"step": self.step, **self._last}
            out_of_time = bool(budget) and time.monotonic() - started > budget
            if (
                self.step % self.cfg.eval_every == 0
                or self.step == self.cfg.max_steps
                or out_of_time
            ):
                record["dev_wer"] = self.evaluate()
                bar.write(
                    f"step {self.step}: dev WER {record['dev_wer']:.4f} "
                    f"({time.monotonic() - started:.0f} s)"
                )
            self.history.append(record)
            if "dev_wer" in record and record["dev_wer"] < self.best_wer:
                self.best_wer = record["dev_wer"]
                self.save_state(self.out / "best")
            if (
                self.step % self.cfg.save_every == 0
                or self.step == self.cfg.max_steps
                or out_of_time
            ):
                self.save_state(self.out / "last")
            if out_of_time:
                bar.write(f"time budget of {self.cfg.max_minutes} min spent at step {self.step}")
                break
        bar.close()
        return self.export(self.out / "final")

    def save_state(self, where: Path) -> None:
        """Everything needed to resume exactly: weights, optimizer, schedule, RNG, position."""
        tmp = where.with_name(where.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ctc_head": self.ctc_head.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(),
            },
            tmp / "trainer.pt",
        )
        state = {"step": self.step, "config": dataclasses.asdict(self.cfg), "history": self.history}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(where, ignore_errors=True)
        tmp.rename(where)

    def _load_state(self, where: Path) -> None:
        blob = torch.load(where / "trainer.pt", weights_only=False)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.ctc_head.load_state_dict(blob["ctc_head"])
        torch.set_rng_state(blob["torch_rng"])
        np.random.set_state(blob["numpy_rng"])
        state = json.loads((where / "trainer_state.json").read_text())
        self.step = state["step"]
        self.history = state["history"]
        self.best_wer = min(
            (r["dev_wer"] for r in self.history if "dev_wer" in r), default=math.inf
        )
        log.info("resumed from %s at step %d", where, self.step)

    def export(self, where: Path) -> Path:
        """The servable checkpoint: weights (fp16 if asked), tokenizer, feature extractor."""
        model = self.model
        source = self.out / "last"
        if self.cfg.export_best and (self.out / "best" / "trainer_state.json").exists():
            source = self.out / "best"
            model = SpeechEncoderDecoderModel.from_pretrained(source, dtype=torch.float32)
        if self.cfg.save_fp16:
            model = SpeechEncoderDecoderModel.from_pretrained(source).half()
        model.save_pretrained(where)
        self.tokenizer.save_pretrained(where)
        self.feature_extractor.save_pretrained(where)
        return where
