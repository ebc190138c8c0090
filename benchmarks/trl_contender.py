"""TRL's RewardTrainer as a contender of bench_trainer.py (needs `pip install -r requirements-bench.txt`)."""

from __future__ import annotations

import copy
import tempfile
import time

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification

from critic.config import ExperimentConfig
from critic.data import PairSet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def word_tokenizer(vocab_size: int, pad_id: int, eos_id: int):
    """A tokenizer whose ids are the benchmark's ids (TRL wants one for its pad and EOS tokens)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab.update({"<pad>": pad_id, "<eos>": eos_id})
    del vocab[f"t{pad_id}"], vocab[f"t{eos_id}"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


class Trl:
    """trl.RewardTrainer, one optimizer step per train() call (so it interleaves with the others).

    The timer runs from on_train_begin to on_step_end: the trainer's setup is excluded, its
    dataloader, collation, forward/backward, clipping, optimizer step and logging are included.
    """
    name = "TRL RewardTrainer"
    packed = False

    def __init__(self, token_model, pairs: PairSet, cfg: ExperimentConfig, device: torch.device) -> None:
        import datasets

        datasets.disable_progress_bars()
        self.model = AutoModelForSequenceClassification.from_config(
            copy.deepcopy(token_model.config), attn_implementation="sdpa").float()
        self.model.model.load_state_dict(token_model.model.state_dict())  # same body; its own last-token head
        self.pairs, self.cfg, self.device = pairs, cfg, device
        config = token_model.config
        self.tokenizer = word_tokenizer(config.vocab_size, config.pad_token_id, config.eos_token_id)
        self.output_dir = tempfile.mkdtemp(prefix="bench_trl_")

    def dataset(self, batch_index: np.ndarray):
        import datasets

        pairs = self.pairs  # sequential sampling: the step takes exactly these pairs, in this order
        return datasets.Dataset.from_dict({
            "chosen_ids": [np.concatenate([pairs.prompt_ids[i], pairs.teacher_ids[i]]).tolist() for i in batch_index],
            "rejected_ids": [np.concatenate([pairs.prompt_ids[i], pairs.student_ids[i]]).tolist()
                             for i in batch_index]})

    def step(self, batch_index: np.ndarray) -> float:
        from transformers import PrinterCallback, TrainerCallback
        from trl import RewardConfig, RewardTrainer

        device = self.device

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _sync(device)
                self.end = time.perf_counter()

        t, timer = self.cfg.train, Timer()
        args = RewardConfig(
            output_dir=self.output_dir, max_steps=1, per_device_train_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=len(batch_index) // t.micro_batch_size, learning_rate=t.lr,
            lr_scheduler_type="constant", weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1],
            max_grad_norm=t.grad_clip, activation_checkpointing=False, bf16=device.type == "cuda",
            use_cpu=device.type == "cpu", train_sampling_strategy="sequential", max_length=None,
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, seed=0)
        trainer = RewardTrainer(model=self.model, args=args, train_dataset=self.dataset(batch_index),
                                processing_class=self.tokenizer, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # its end-of-training summary would break the table
        trainer.train()
        return timer.end - timer.start


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True
